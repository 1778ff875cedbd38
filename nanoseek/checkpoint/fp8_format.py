"""The official DeepSeek-V3 FP8 checkpoint format (as released on Hugging Face), in pure torch.

Every projection weight of attention, dense FFN, experts and shared experts is stored as
`float8_e4m3fn` with an fp32 `<name>_scale_inv` of shape [ceil(out/128), ceil(in/128)]:
    W[i, j] = W_fp8[i, j] * scale_inv[i // 128, j // 128]
Edge blocks may be smaller than 128 (V3's kv_a_proj_with_mqa has 576 rows: its last row block
holds 64); expanding the scales and cropping handles them exactly.

The block maths is nanoseek/fp8/quant.py's 128x128 weight tiling (the one FP8 training uses
[V3 §3.3.2]); this module adds what a file format needs on top: which keys are FP8, shape
checks that name the tensor, and a refusal to store inf/nan.
"""

from __future__ import annotations

import re

import torch

from nanoseek.fp8.quant import BLOCK, FP8_MAX, Quantized, ceil_div, quantize_128x128

__all__ = [
    "BLOCK",
    "FP8_MAX",
    "QUANTIZATION_CONFIG",
    "block_dequantize",
    "block_quantize",
    "is_quantized_key",
]

QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}
# which weights are FP8 in the release: projections only; embedding, head, norms, the router
# and its bias, and the MTP layers' eh_proj (BF16 in the V3 release) stay in high precision
_QUANTIZED = re.compile(
    r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.shared_experts\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj))\.weight$"
)


def is_quantized_key(key: str) -> bool:
    """Whether the official FP8 release stores this HF key in float8 with a scale."""
    return bool(_QUANTIZED.search(key)) and key.startswith("model.layers.")


def block_dequantize(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """w_fp8 [out,in] float8, scale_inv [ceil(out/128), ceil(in/128)] fp32 -> [out,in] `dtype`,
    computed in fp32 (exactly w_fp8.float() * scale) before the cast to `dtype`."""
    if w_fp8.dim() != 2:
        raise ValueError(f"block FP8 weights must be 2D, got shape {tuple(w_fp8.shape)}")
    out_f, in_f = w_fp8.shape
    rows, cols = ceil_div(out_f, BLOCK), ceil_div(in_f, BLOCK)
    if tuple(scale_inv.shape) != (rows, cols):
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}, expected ({rows}, {cols}) "
            f"for a [{out_f}, {in_f}] weight in {BLOCK}x{BLOCK} blocks"
        )
    # contiguous: a ragged weight comes back as a cropped view, and safetensors stores only
    # contiguous tensors
    return Quantized(w_fp8, scale_inv.float(), BLOCK).dequantize(dtype).contiguous()


def block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out,in] -> (w_fp8 [out,in] float8_e4m3fn, scale_inv [ceil(out/128), ceil(in/128)] fp32),
    per block s = amax(|block|)/448 so the block's largest value maps to the largest fp8.
    An all-zero block gets s = 1 (any s would do; 0 would divide by zero)."""
    if w.dim() != 2:
        raise ValueError(f"block FP8 weights must be 2D, got shape {tuple(w.shape)}")
    q = quantize_128x128(w, check_finite=True)
    return q.data, q.scale
