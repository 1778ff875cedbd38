"""Fine-grained FP8 quantisation [V3 §3.3.2, Figure 7a].

Two tilings, both with one fp32 scale per tile, `scale = amax(|tile|) / 448` computed online
(from the tensor itself, every call: no delayed/history scaling):
- 1x128 tiles for activations and activation gradients: one row (token), 128 columns (channels).
- 128x128 blocks for weights: 128 output rows x 128 input columns.
The value stored is `q = e4m3(x / scale)`, so `x ~= q * scale`: `scale` is a *dequantisation*
multiplier, what the official checkpoint calls `scale_inv` and what the GPU kernel wants.

Shape legend: R rows, C columns (the tiled dim is always the last one, C), Cb = ceil(C/128),
Rb = ceil(R/128).

Scale layout (backend-neutral, row-major; the CUDA backend rearranges it for the kernel):
- 1x128:   data [..., R, C] fp8, scale [..., R, Cb]   scale[r, j] covers data[r, 128j : 128j+128]
- 128x128: data [..., R, C] fp8, scale [..., Rb, Cb]  scale[i, j] covers the block
           data[128i : 128i+128, 128j : 128j+128]; same layout as the official `weight_scale_inv`
           of the FP8 release, so a weight quantised here is bit-identical to the released format.
Dims that are not multiples of 128 get a ragged last tile: its scale comes from its real
elements only (computed as if zero-padded: zeros never raise an amax), and `data` keeps the
unpadded shape.

Error bound (tests/fp8/test_quant.py): e4m3 has 3 mantissa bits, so round-to-nearest of a
normal value (|x/scale| >= 2^-6) errs by at most half an ulp = 2^-4 relative; below that the
subnormal spacing is 2^-9, an absolute error <= 2^-10 in scaled units. Hence per element
    |dequant(quant(x)) - x| <= 2^-4 |x| + 2^-10 scale   (+ fp32 rounding, ~2^-22 |x|)
and per tile the largest error is at most half an ulp of the top binade [256, 448], 16 * scale
(= amax / 28 when scale = amax / 448).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn; V3 uses E4M3 for every GEMM operand [V3 §3.3.2]
BLOCK = 128  # tile edge [V3 §3.3.2]: 1x128 activation tiles, 128x128 weight blocks


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


@dataclass
class Quantized:
    """An FP8 tensor with its per-tile scales; `block_rows` is 1 (1x128) or 128 (128x128)."""

    data: torch.Tensor  # [..., R, C] float8_e4m3fn
    scale: torch.Tensor  # fp32, [..., R, Cb] (1x128) or [..., Rb, Cb] (128x128)
    block_rows: int

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """data * scale, each scale spread over its tile; computed in fp32, then cast."""
        *lead, R, C = self.data.shape
        Rp, Cp = (R if self.block_rows == 1 else round_up(R, BLOCK)), round_up(C, BLOCK)
        q = _pad_last2(self.data.float(), Rp, Cp)
        if self.block_rows == 1:
            x = q.reshape(*lead, R, Cp // BLOCK, BLOCK) * self.scale[..., None]
        else:
            x = q.reshape(*lead, Rp // BLOCK, BLOCK, Cp // BLOCK, BLOCK)
            x = x * self.scale[..., :, None, :, None]
        return x.reshape(*lead, Rp, Cp)[..., :R, :C].to(dtype)

    def scale_per_element(self) -> torch.Tensor:
        """Each element's scale, [..., R, C] fp32 (for error bounds and tests)."""
        R, C = self.data.shape[-2:]
        s = self.scale.repeat_interleave(BLOCK, -1)[..., :C]
        return s if self.block_rows == 1 else s.repeat_interleave(BLOCK, -2)[..., :R, :]

    def t(self) -> Quantized:
        """Transpose of a 2D 128x128-blocked tensor: a block-quantised W^T is exactly the
        transposed W_fp8 with transposed scales, which is why V3 blocks weights 128x128: the
        backward pass reuses the forward's quantised weight [V3 §3.3.2]. 1x128 tiles are
        not transpose-invariant (they would become 128x1): quantise `x.t()` afresh instead."""
        if self.block_rows != BLOCK or self.data.dim() != 2:
            raise ValueError("only a 2D 128x128-blocked tensor can be transposed")
        return Quantized(self.data.t(), self.scale.t(), BLOCK)

    def rows(self, start: int, end: int) -> Quantized:
        """Rows [start, end) of a 1x128-tiled tensor (tiles never cross rows, so this is a view)."""
        if self.block_rows != 1:
            raise ValueError("row slices are only tile-aligned for 1x128 tiles")
        return Quantized(self.data[start:end], self.scale[start:end], 1)

    def __getitem__(self, e: int) -> Quantized:
        """Expert e of a stack [E, R, C] (the leading dim is never tiled)."""
        return Quantized(self.data[e], self.scale[e], self.block_rows)


def _pad_last2(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dims of x up to (rows, cols); no copy when already that size."""
    R, C = x.shape[-2:]
    if (R, C) == (rows, cols):
        return x
    return F.pad(x, (0, cols - C, 0, rows - R))


def scale_from_amax(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """amax (fp32) -> dequantisation scale. `amax / 448` maps the tile's largest magnitude onto
    e4m3's largest finite value [V3 §3.3.2]. With `pow2` the scale is rounded *up* to a power
    of two (then amax / scale lies in (224, 448]): scaling becomes exact, so quantising an
    already-quantised tensor, or dequantising in any order, is lossless. An all-zero tile gets
    scale 1 (any would do; 0 would divide by zero), as in the official FP8 release."""
    scale = amax.float() / FP8_MAX
    if pow2:
        # frexp is exact: scale = m * 2^e with m in [0.5, 1); m == 0.5 is already a power of 2
        m, e = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), torch.where(m == 0.5, e - 1, e))
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    # clamp first: fp32 rounding of x / scale may land a hair above 448, and a CUDA cast of an
    # out-of-range value gives NaN (e4m3fn has no inf); the CPU cast happens to saturate
    return x.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_1x128(x: torch.Tensor, pow2: bool = False) -> Quantized:
    """Activations / activation gradients: x [..., R, C] -> 1x128 tiles along C.

    Quantise the tensor so that C is the GEMM's contraction dim: a tile's scale must be
    constant along the dot product it feeds, so it can be applied once per 128-long partial
    sum [V3 §3.3.2, Figure 7a]."""
    *lead, R, C = x.shape
    Cb = ceil_div(C, BLOCK)
    xp = _pad_last2(x.float(), R, Cb * BLOCK)
    tiles = xp.reshape(*lead, R, Cb, BLOCK)
    scale = scale_from_amax(tiles.abs().amax(-1), pow2)  # [..., R, Cb]
    q = _to_fp8(tiles / scale[..., None]).reshape(*lead, R, Cb * BLOCK)
    if Cb * BLOCK != C:
        q = q[..., :C].contiguous()
    return Quantized(q, scale, 1)


def quantize_128x128(w: torch.Tensor, pow2: bool = False, check_finite: bool = False) -> Quantized:
    """Weights: w [..., R, C] (R = out features, C = in features) -> 128x128 blocks.
    `check_finite`: ValueError on an inf/nan entry (one check of the block amaxes, which
    propagate both; it waits for the device, so the training GEMMs leave it off and the
    checkpoint writer, nanoseek/checkpoint/fp8_format.py, turns it on)."""
    *lead, R, C = w.shape
    Rb, Cb = ceil_div(R, BLOCK), ceil_div(C, BLOCK)
    wp = _pad_last2(w.float(), Rb * BLOCK, Cb * BLOCK)
    blocks = wp.reshape(*lead, Rb, BLOCK, Cb, BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., Rb, Cb]
    if check_finite and not torch.isfinite(amax).all():
        raise ValueError("cannot quantise a weight with inf/nan entries to FP8")
    scale = scale_from_amax(amax, pow2)
    q = _to_fp8(blocks / scale[..., :, None, :, None]).reshape(*lead, Rb * BLOCK, Cb * BLOCK)
    if (Rb * BLOCK, Cb * BLOCK) != (R, C):
        q = q[..., :R, :C].contiguous()
    return Quantized(q, scale, BLOCK)


def quant_error_bound(x: torch.Tensor, q: Quantized) -> torch.Tensor:
    """The elementwise bound above, |x - q.dequantize()| <= 2^-4 |x| + 2^-10 scale, as an fp64
    tensor shaped like x, with a little slack for fp32 rounding. Used by tests and benches."""
    return (2.0**-4 + 2.0**-20) * x.double().abs() + 2.0**-10 * q.scale_per_element().double()
