"""FP8 GEMM backends: one operation, `mm(a, b) = a @ b^T` on quantised operands.

Every FP8 GEMM of training has this form (nanoseek/fp8/linear.py says which operand is what):
    a [M,K] in 1x128 tiles along K,  b [N,K] in 1x128 tiles or 128x128 blocks along K
    -> c [M,N], each 128-long partial sum scaled by s_a * s_b and accumulated in fp32.
K is the contraction dim of both operands, so every tile's scale is constant along the dot
product it feeds [V3 §3.3.2]. Backends:
- `emulated`: dequantise, fp32 matmul. Runs on any device; the numerics reference. On CPU FP8
  is a numerics feature, not a speed feature: this is slower than bf16.
- `cuda_blockwise`: the real kernel, `torch.nn.functional.scaled_mm` with
  `ScalingType.BlockWise1x128` / `BlockWise128x128` (cuBLASLt, sm_90 only, CUDA >= 12.9).
- `auto`: cuda_blockwise where it runs, emulated elsewhere, decided per call from the device.
`rowwise_scaled_mm` is a CPU cross-check of the emulation through `torch._scaled_mm`, which
takes row-wise but not block-wise scales on CPU.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from nanoseek.fp8.quant import BLOCK, FP8_DTYPE, Quantized, round_up

BACKENDS = ("auto", "emulated", "cuda_blockwise")


class FP8Backend(Protocol):
    name: str

    def mm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32):
        """a [M,K] (1x128 tiles), b [N,K] (1x128 or 128x128) -> a @ b^T [M,N] in out_dtype."""
        ...


def _check_operands(a: Quantized, b: Quantized) -> None:
    if a.data.dim() != 2 or b.data.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"FP8 mm needs a [M,K] and b [N,K], got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.block_rows != 1:
        raise ValueError(
            "the left FP8 operand must be in 1x128 tiles (the kernel has no 128x128 x 1x128 layout here)"
        )
    if a.data.dtype != FP8_DTYPE or b.data.dtype != FP8_DTYPE:
        raise ValueError(f"FP8 mm needs {FP8_DTYPE} operands, got {a.data.dtype}, {b.data.dtype}")


class EmulatedBackend:
    """Exact CPU/any-device emulation: x_hat = q * s in fp32, then an fp32 GEMM.

    Equals the kernel's result up to fp32 summation order: e4m3 products are exact in fp32 and
    the kernel, too, accumulates in fp32 with the scales applied per 128-long partial sum
    (V3 §3.3.2 promotes partial sums to fp32 every 128 elements of K). With power-of-two scales
    the dequantisation itself is exact. Footgun on CUDA: with TF32 matmuls enabled, the fp32
    GEMM would round the dequantised operands to 10 mantissa bits; leave TF32 off for it."""

    name = "emulated"

    def mm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32):
        _check_operands(a, b)
        # an ambient bf16 autocast would turn this fp32 GEMM into a bf16 one
        with torch.autocast(a.data.device.type, enabled=False):
            c = a.dequantize() @ b.dequantize().t()  # [M,N] fp32
        return c.to(out_dtype)


def _pad_fp8(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an fp8 matrix to [rows, cols], row-major. Done on the uint8 view (e4m3 zero is
    0x00) since padding kernels for float8 dtypes are not available on every device."""
    u = t.contiguous().view(torch.uint8)
    if tuple(u.shape) != (rows, cols):
        u = F.pad(u, (0, cols - u.shape[1], 0, rows - u.shape[0]))
    return u.view(FP8_DTYPE)


def _pad_scale(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Pad a scale matrix with ones to [rows, cols], row-major contiguous (padded data is zero,
    so the padded scales never matter; 1 keeps them finite)."""
    s = s.float()
    if tuple(s.shape) != (rows, cols):
        s = F.pad(s, (0, cols - s.shape[1], 0, rows - s.shape[0]), value=1.0)
    return s.contiguous()


class CudaBlockwiseBackend:
    """`F.scaled_mm` with DeepSeek-style scales on Hopper (cuBLASLt >= 12.9, sm_90 exactly).

    Kernel layouts (torch 2.13, aten ScaledBlas `_scaled_block1x128_block128x128` and friends):
    - mat_a [M,K] row-major, mat_b [K,N] column-major (our b [N,K] row-major, transposed view);
    - 1x128 scales [rows, K/128], "outer-dim-major": strides (1, rows);
    - 128x128 scales of mat_b: [round_up(K/128, 4), N/128] with strides (1, round_up(K/128, 4)),
      i.e. our row-major [N/128, K/128] scales with K/128 padded to a multiple of 4, transposed.
    Every dim is zero-padded up to a multiple of 128 first. Zero padding is exact (zeros add
    nothing to a dot product and raise no tile's amax) and keeps us to the shapes cuBLAS and
    torch's own tests exercise; ragged K blocks and unaligned scale strides are avoided. It is
    free for the usual sizes; ragged token counts (per expert, say) pay a small copy."""

    name = "cuda_blockwise"

    def mm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32):
        # only in torch builds with block-scaled scaled_mm: cuda_blockwise_unavailable checks
        from torch.nn.functional import ScalingType

        _check_operands(a, b)
        M, K = a.shape
        N = b.shape[0]
        if 0 in (M, N, K):
            return torch.zeros(M, N, dtype=out_dtype, device=a.data.device)
        Mp, Np, Kp = round_up(M, BLOCK), round_up(N, BLOCK), round_up(K, BLOCK)
        Kb = Kp // BLOCK
        a_data, b_data = _pad_fp8(a.data, Mp, Kp), _pad_fp8(b.data, Np, Kp)
        a_scale = _pad_scale(a.scale, Mp, Kb).t().contiguous().t()  # [Mp,Kb], strides (1, Mp)
        if b.block_rows == 1:
            b_scale = _pad_scale(b.scale, Np, Kb).t().contiguous().t()  # [Np,Kb], strides (1, Np)
            recipe_b = ScalingType.BlockWise1x128
        else:
            b_scale = _pad_scale(b.scale, Np // BLOCK, round_up(Kb, 4)).t()  # [Kb4, Nb]
            recipe_b = ScalingType.BlockWise128x128
        c = F.scaled_mm(
            a_data,
            b_data.t(),
            a_scale,
            ScalingType.BlockWise1x128,
            b_scale,
            recipe_b,
            output_dtype=out_dtype,
        )
        return c[:M, :N]


def cuda_blockwise_unavailable(device: torch.device | str | None) -> str | None:
    """Why the block-wise kernel cannot run on `device` (None when it can)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda":
        return f"device is {device.type}, the block-wise FP8 kernel needs a CUDA GPU"
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm"
    if torch.version.hip is not None:
        return "ROCm has no 1x128/128x128 scaled_mm"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:  # torch's _check_deepseek_support: Hopper only, not sm_100+
        return f"this GPU is sm_{major}{minor}; DeepSeek-style block scaling runs only on sm_90"
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < (12, 9):
        return f"CUDA {torch.version.cuda} < 12.9 (cuBLASLt block scaling)"
    return None


class AutoBackend:
    """cuda_blockwise where it runs, else emulated; resolved per device, so a model converted
    on CPU and moved to an H100 afterwards picks the kernel up."""

    name = "auto"

    def __init__(self) -> None:
        self._emulated = EmulatedBackend()
        self._cuda = CudaBlockwiseBackend()
        self._resolved: dict[torch.device, FP8Backend] = {}

    def resolve(self, device: torch.device | str) -> FP8Backend:
        device = torch.device(device)
        if device not in self._resolved:
            ok = cuda_blockwise_unavailable(device) is None
            self._resolved[device] = self._cuda if ok else self._emulated
        return self._resolved[device]

    def mm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32):
        return self.resolve(a.data.device).mm(a, b, out_dtype)


def get_backend(
    backend: str | FP8Backend = "auto", device: torch.device | str | None = None
) -> FP8Backend:
    """A backend by name (`auto`, `emulated`, `cuda_blockwise`) or an object with `.mm`.
    `cuda_blockwise` is checked against `device` (default: the current CUDA device)."""
    if not isinstance(backend, str):
        if not callable(getattr(backend, "mm", None)):
            raise ValueError(f"an FP8 backend needs an mm(a, b, out_dtype) method, got {backend!r}")
        return backend
    if backend == "auto":
        return AutoBackend()
    if backend == "emulated":
        return EmulatedBackend()
    if backend == "cuda_blockwise":
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        why = cuda_blockwise_unavailable(device)
        if why is not None:
            raise ValueError(f"FP8 backend 'cuda_blockwise' cannot run here: {why}")
        return CudaBlockwiseBackend()
    raise ValueError(f"FP8 backend must be one of {BACKENDS}, got {backend!r}")


def rowwise_scaled_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype = torch.float32):
    """Cross-check of the emulation through `torch._scaled_mm` with row-wise scales (runs on
    CPU). Only valid when all tiles of a row share one scale (one tile per row, K <= 128, or
    scales set that way); raises ValueError otherwise."""
    _check_operands(a, b)
    N = b.shape[0]
    s_b = b.scale if b.block_rows == 1 else b.scale.repeat_interleave(BLOCK, 0)[:N]
    for s, what in ((a.scale, "a"), (s_b, "b")):
        if s.numel() and not bool((s == s[:, :1]).all()):
            raise ValueError(
                f"rowwise_scaled_mm: the tiles of a row of {what} have different scales"
            )
    return torch._scaled_mm(
        a.data,
        b.data.contiguous().t(),  # column-major mat2
        scale_a=a.scale[:, :1].float().contiguous(),  # [M,1]
        scale_b=s_b[:, :1].float().reshape(1, N).contiguous(),  # [1,N]
        out_dtype=out_dtype,
    )
