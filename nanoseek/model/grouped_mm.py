"""`torch._grouped_mm` in fp32 as a custom op that torch.compile can trace.

torch's fake (tracing) kernel for `_grouped_mm` admits only bf16 inputs, although the CPU kernel
runs fp32 too (the routed experts of an fp32 run, nanoseek/model/moe.py). Tracing it would fail,
and hiding it behind `torch.compiler.disable` breaks the MoE layer's graph in two. Wrapped as a
custom op with its own shape rule and backward it stays inside one graph; eager code keeps
calling `torch._grouped_mm` directly (moe.py uses this only while compiling).

The backward is the one autograd derives for `_grouped_mm` (checked bit for bit against it in
tests/train/test_compile.py): for y_e = x_e w_e over each expert's rows,
    dx_e = dy_e w_e^T            one grouped GEMM over the same row blocks,
    dw_e = x_e^T dy_e            a grouped GEMM whose K dimension is split by `offs`.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M,in] (expert e's rows end at offs[e]), w_t [E,in,out] -> [M,out]."""
    return torch._grouped_mm(x, w_t, offs=offs)


@grouped_mm.register_fake
def _(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w_t.shape[-1])


@torch.library.custom_op("nanoseek::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M,in], grad [M,out] (same row blocks) -> [E,in,out], x_e^T grad_e per expert."""
    return torch._grouped_mm(x.t(), grad, offs=offs)


@grouped_mm_weight_grad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x, w_t, offs = inputs
    ctx.save_for_backward(x, w_t, offs)


def _backward(ctx, grad: torch.Tensor):
    x, w_t, offs = ctx.saved_tensors
    grad_x = grad_w_t = None
    if ctx.needs_input_grad[0]:
        grad_x = grouped_mm(grad, w_t.transpose(1, 2), offs)  # [M,out] x [E,out,in]
    if ctx.needs_input_grad[1]:
        grad_w_t = grouped_mm_weight_grad(x, grad, offs)  # [E,in,out]
    return grad_x, grad_w_t, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
