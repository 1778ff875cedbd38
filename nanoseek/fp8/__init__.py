"""FP8 mixed-precision training with DeepSeek-V3's fine-grained scaling [V3 §3.3].

quant.py     1x128 / 128x128 quantisation to float8_e4m3fn, scale = amax / 448 online
backends.py  FP8 GEMM backends: emulated (reference, any device), cuda_blockwise (sm_90), auto
linear.py    FP8Linear: Fprop, Dgrad and Wgrad GEMMs in FP8 with fp32 accumulation
grouped.py   fp8_grouped_linear: the same for routed experts (drop-in for grouped_linear)
convert.py   convert_to_fp8(model): swap the recipe's layers in place, report what changed
"""

from nanoseek.fp8.backends import (
    BACKENDS,
    AutoBackend,
    CudaBlockwiseBackend,
    EmulatedBackend,
    FP8Backend,
    cuda_blockwise_unavailable,
    get_backend,
    rowwise_scaled_mm,
)
from nanoseek.fp8.convert import FP8Report, convert_for_fp8, convert_to_fp8, fp8_experts_hook
from nanoseek.fp8.grouped import fp8_grouped_linear, make_fp8_grouped_linear
from nanoseek.fp8.linear import FP8Linear, check_fp8_weight, fp8_linear
from nanoseek.fp8.quant import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    Quantized,
    quant_error_bound,
    quantize_1x128,
    quantize_128x128,
    scale_from_amax,
)

__all__ = [
    "BACKENDS",
    "BLOCK",
    "convert_for_fp8",
    "FP8_DTYPE",
    "FP8_MAX",
    "AutoBackend",
    "CudaBlockwiseBackend",
    "EmulatedBackend",
    "FP8Backend",
    "FP8Linear",
    "FP8Report",
    "Quantized",
    "check_fp8_weight",
    "convert_to_fp8",
    "cuda_blockwise_unavailable",
    "fp8_experts_hook",
    "fp8_grouped_linear",
    "fp8_linear",
    "get_backend",
    "make_fp8_grouped_linear",
    "quant_error_bound",
    "quantize_1x128",
    "quantize_128x128",
    "rowwise_scaled_mm",
    "scale_from_amax",
]
