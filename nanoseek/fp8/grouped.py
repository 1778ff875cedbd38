"""FP8 routed experts: `grouped_linear` with all three GEMMs in FP8 [V3 §3.3].

Shape legend: M token-expert pairs (rows of x, sorted by expert, counts[e] rows for expert e),
E experts, K in features, N out features.

Same signature and result as nanoseek.model.moe.grouped_linear(x, w, offs):
    x [M,K], w [E,N,K] -> y [M,N], rows of expert e: x_e @ w_e^T
with the tilings of nanoseek/fp8/linear.py applied per expert:
- Fprop / Dgrad: x and dy in 1x128 tiles along features. A tile never crosses a row, so one
  quantisation of all M rows serves every expert; each expert's weight gets its own 128x128
  blocks (blocks never straddle two experts).
- Wgrad: dW_e = dY_e^T X_e contracts over expert e's tokens only, so the token tiles are cut
  per expert: a 128-token tile straddling two experts would share one scale between two
  separate GEMMs. The last tile of each expert is ragged.
One host sync reads the counts (like grouped_linear's fallback); then one FP8 GEMM per expert.
"""

from __future__ import annotations

from functools import partial

import torch

from nanoseek.fp8.backends import FP8Backend, get_backend
from nanoseek.fp8.quant import BLOCK, Quantized, quantize_1x128, quantize_128x128
from nanoseek.model.moe import compute_dtype


def _bounds(sizes: list[int]):
    """(expert, start, end) of each non-empty expert's row block."""
    start = 0
    for e, n in enumerate(sizes):
        if n:
            yield e, start, start + n
        start += n


class _FP8GroupedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts, backend: FP8Backend, pow2: bool, out_dtype: torch.dtype):
        sizes = counts.tolist()  # host sync for the split sizes
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"counts sum to {sum(sizes)} but x has {x.shape[0]} rows")
        xq = quantize_1x128(x, pow2)  # [M,K], tiles along K
        wq = quantize_128x128(w, pow2)  # [E,N,K], 128x128 blocks per expert
        y = x.new_zeros(x.shape[0], w.shape[1], dtype=torch.float32)  # [M,N]
        for e, s, t in _bounds(sizes):
            y[s:t] = backend.mm(xq.rows(s, t), wq[e])
        ctx.save_for_backward(xq.data, xq.scale, wq.data, wq.scale)
        ctx.sizes, ctx.backend, ctx.pow2 = sizes, backend, pow2
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        xq, wq = Quantized(x_data, x_scale, 1), Quantized(w_data, w_scale, BLOCK)
        backend, pow2, sizes = ctx.backend, ctx.pow2, ctx.sizes
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq = quantize_1x128(dy, pow2)  # [M,N], tiles along N
            dx = torch.zeros(x_data.shape, dtype=torch.float32, device=dy.device)  # [M,K]
            for e, s, t in _bounds(sizes):
                dx[s:t] = backend.mm(dyq.rows(s, t), wq[e].t())
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x_hat = xq.dequantize()  # the cached FP8 activation, re-tiled along tokens below
            dw = torch.zeros(w_data.shape, dtype=torch.float32, device=dy.device)  # [E,N,K]
            for e, s, t in _bounds(sizes):
                dy_t = quantize_1x128(dy[s:t].t(), pow2)  # [N,m_e], tiles along e's tokens
                x_t = quantize_1x128(x_hat[s:t].t(), pow2)  # [K,m_e]
                dw[e] = backend.mm(dy_t, x_t)
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None, None, None


def fp8_grouped_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    backend: str | FP8Backend = "auto",
    pow2_scales: bool = False,
) -> torch.Tensor:
    """Drop-in FP8 `grouped_linear`: x [M,K] sorted by expert, w [E,N,K], offs [E] (end row of
    each expert's block) -> [M,N]."""
    counts = offs.diff(prepend=offs.new_zeros(1))
    return _FP8GroupedFn.apply(x, w, counts, get_backend(backend), pow2_scales, compute_dtype(x))


def make_fp8_grouped_linear(backend: str | FP8Backend = "auto", pow2_scales: bool = False):
    """fp8_grouped_linear with its backend fixed: what `RoutedExperts.linear_fn` gets."""
    return partial(fp8_grouped_linear, backend=get_backend(backend), pow2_scales=pow2_scales)
