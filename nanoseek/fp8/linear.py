"""FP8 Linear: all three GEMMs in FP8 with fine-grained scales [V3 §3.3, Figures 6-7].

Shape legend: M tokens (all leading dims of x flattened), K in_features, N out_features.
Each GEMM is `backend.mm(a, b) = a @ b^T` with the contraction dim last in both operands, and
each operand tiled so its scales are constant along that contraction (nanoseek/fp8/backends.py):

  GEMM    result           a (1x128 tiles along ...)     b                               contraction
  Fprop   Y  [M,N] = X W^T   X  [M,K] per token, along K     W   [N,K] 128x128 blocks          K
  Dgrad   dX [M,K] = dY W    dY [M,N] per token, along N     W^T [K,N] the same blocks, transposed N
  Wgrad   dW [N,K] = dY^T X  dY^T [N,M] along tokens M       X^T [K,M] along tokens M          M

Fprop/Dgrad: activations and their gradients in 1x128 tiles (per token, per 128 channels),
weights in 128x128 blocks [V3 §3.3.2]. A 128x128 block grid is the same for W and
W^T, so the forward's quantised weight serves Dgrad unchanged, only transposed.
Wgrad contracts over tokens, so both operands are tiled along tokens: 1x128 tiles of dY^T and
X^T, i.e. 128x1 tiles (128 tokens x 1 channel) of dY and X. V3 caches the forward's FP8
activations for the Linear's backward and converts their 1x128 tiles to 128x1 tiles there
[V3 §3.3.3]; we do the same (dequantise the cached FP8 X, requantise along tokens), so a saved
activation costs 1 byte + scales, and Wgrad sees V3's double quantisation (with power-of-two
scales the second quantisation is nearly lossless: measured Wgrad error 3.8% vs 4.4%).
Gradients never get 128x128 blocks: block-wise activation gradients diverged for V3 at 16B
scale [V3 Appendix B.2]. All GEMMs accumulate in fp32; Y comes out in the autocast dtype (or x's
dtype), dX in x's dtype, dW in the weight's dtype (fp32 master weights stay fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.fp8.backends import FP8Backend, get_backend
from nanoseek.fp8.quant import BLOCK, Quantized, quantize_1x128, quantize_128x128
from nanoseek.model.moe import compute_dtype


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, backend: FP8Backend, pow2: bool, out_dtype: torch.dtype):
        N, K = weight.shape
        x2 = x.reshape(-1, K)  # [M,K]
        xq = quantize_1x128(x2, pow2)  # Fprop a: 1x128 tiles along K
        wq = quantize_128x128(weight, pow2)  # Fprop b: 128x128 blocks
        y = backend.mm(xq, wq)  # [M,N] fp32
        if bias is not None:
            y = y + bias.float()
        # the FP8 copies, not x and W: what V3 caches for the backward pass [V3 §3.3.3]
        ctx.save_for_backward(xq.data, xq.scale, wq.data, wq.scale)
        ctx.backend, ctx.pow2 = backend, pow2
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(out_dtype).reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        xq, wq = Quantized(x_data, x_scale, 1), Quantized(w_data, w_scale, BLOCK)
        backend, pow2 = ctx.backend, ctx.pow2
        N = w_data.shape[0]
        dy2 = dy.reshape(-1, N)  # [M,N]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dyq = quantize_1x128(dy2, pow2)  # Dgrad a: 1x128 tiles along N (per token)
            dx = backend.mm(dyq, wq.t()).to(ctx.x_dtype).reshape(ctx.x_shape)  # [M,K]
        if ctx.needs_input_grad[1]:
            dy_t = quantize_1x128(dy2.t(), pow2)  # Wgrad a: dY^T [N,M], tiles along tokens
            x_t = quantize_1x128(xq.dequantize().t(), pow2)  # Wgrad b: X^T [K,M], 1x128 -> 128x1
            dw = backend.mm(dy_t, x_t).to(ctx.w_dtype)  # [N,K]
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | FP8Backend = "auto",
    pow2_scales: bool = False,
) -> torch.Tensor:
    """F.linear with FP8 Fprop, Dgrad and Wgrad: x [..., K], weight [N,K] -> [..., N]."""
    return _FP8LinearFn.apply(x, weight, bias, get_backend(backend), pow2_scales, compute_dtype(x))


def check_fp8_weight(name: str, weight: torch.Tensor, ndim: int = 2) -> None:
    """Raise a ValueError naming the layer when its weight cannot train in FP8.

    Every size works (ragged tiles; the CUDA backend zero-pads to multiples of 128), so the
    limits are: a float master weight (an FP8 checkpoint tensor must be dequantised first, it
    cannot be the fp32 master the optimizer updates) of the right rank, and no empty dim
    (there is no tile to take an amax of)."""
    if weight.dim() != ndim:
        raise ValueError(
            f"cannot convert {name} to FP8: expected a {ndim}D weight, got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point() or weight.element_size() < 2:
        raise ValueError(
            f"cannot convert {name} to FP8: its weight is {weight.dtype}; FP8 training quantises "
            "a bf16/fp32 master weight on the fly (load FP8 checkpoints dequantised)"
        )
    if 0 in weight.shape:
        raise ValueError(
            f"cannot convert {name} to FP8: weight shape {tuple(weight.shape)} has an empty "
            "dimension, so there is no 1x128 / 128x128 tile to scale"
        )


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8; parameters, state-dict keys and dtypes unchanged.

    Weights stay in full precision (the optimizer's fp32 master copy) and are quantised on the
    fly each forward, so checkpoints save normally. A subclass of nn.Linear, so code that
    initialises or inspects Linears (`init_weights`, parameter counts) treats it as one."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        backend: str | FP8Backend = "auto",
        pow2_scales: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.backend = get_backend(backend)
        self.pow2_scales = pow2_scales

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        backend: str | FP8Backend = "auto",
        pow2_scales: bool = False,
        name: str = "linear",
    ) -> FP8Linear:
        """Wrap an existing Linear, sharing its Parameter objects (no copy, so an optimizer
        built earlier still updates them)."""
        check_fp8_weight(name, linear.weight)
        with torch.device("meta"):  # no throwaway allocation for the replaced parameters
            new = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                backend=backend,
                pow2_scales=pow2_scales,
            )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8LinearFn.apply(
            x, self.weight, self.bias, self.backend, self.pow2_scales, compute_dtype(x)
        )

    def extra_repr(self) -> str:
        pow2 = ", pow2_scales=True" if self.pow2_scales else ""
        return f"{super().extra_repr()}, fp8={self.backend.name}{pow2}"
