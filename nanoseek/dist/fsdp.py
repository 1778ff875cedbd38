"""Sharding the weights and reducing the gradients.

FSDP2 `fully_shard` per block: every decoder layer and MTP module is one unit
(all-gathered just before its forward and backward, resharded after), the embedding another, and
the root keeps the final norm and the head (and the MTP modules' output norms). Expert slices under expert parallelism are their own
units on the "dp" sub-mesh: they differ between ep ranks, so they must never be sharded (or
averaged) across them.

Global semantics: the trainer divides each rank's loss by the *global* number of target tokens,
so gradients are summed across ranks, never averaged (gradient divide factor 1); accumulation,
data parallelism and expert parallelism then all agree.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def mixed_precision(precision: str):
    """bf16: weights all-gathered and used in bf16, gradients reduced in fp32, fp32 master
    weights and optimizer; activations are left to the trainer's autocast, as on one process."""
    if precision == "bf16":
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    return MixedPrecisionPolicy()


def apply_fsdp(model, world_mesh, dp_mesh, expert_modules: list[nn.Module], precision: str):
    mp = mixed_precision(precision)
    ignored = None
    if dp_mesh.size() > 1:
        for experts in expert_modules:  # first: the blocks around must not claim their weights
            fully_shard(experts, mesh=dp_mesh, mp_policy=mp)
    elif expert_modules:
        # one rank per expert slice: nothing to shard or reduce (a 1-rank FSDP unit would only
        # copy the weights in and out at every use); the units around must leave them alone
        ignored = {p for m in expert_modules for p in m.parameters()}
    shard = dict(mesh=world_mesh, mp_policy=mp, ignored_params=ignored)
    for block in model.model.layers:
        fully_shard(block, **shard)
    for layer in model.mtp:
        # CausalLM.forward applies `shared_head.norm` after the MTP layer has returned, when a
        # unit's weights are resharded again: that norm goes to the root unit, the rest of the
        # layer is one unit
        fully_shard([m for name, m in layer.named_children() if name != "shared_head"], **shard)
    if not model.config.tie_word_embeddings:  # a tied embedding is the head: it stays in the root
        fully_shard(model.model.embed_tokens, **shard)
    fully_shard(model, **shard)  # final norm + head
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # sum: the loss is already globally normalised
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def all_reduce_grads(params: list[nn.Parameter], group=None) -> None:
    """Sum replicated gradients over `group` in one flat buffer (one collective, not one per
    tensor); a missing gradient counts as zero, so every rank sends the same layout."""
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


def clip_grad_norm_(params: list[nn.Parameter], copies: list[int], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ over gradients spread across ranks: each rank adds the
    squares of what it holds, divided by the number of ranks holding the same values (1 for a
    shard or an expert slice, W for a replicated weight), and one all-reduce sums them."""
    grads = [(p.grad, c) for p, c in zip(params, copies) if p.grad is not None]
    if not grads:
        return 0.0
    device = _local(grads[0][0]).device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g, c in grads:
        sq += _local(g).float().pow(2).sum() / c
    dist.all_reduce(sq)
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # the same formula as torch's
    for g, _ in grads:
        _local(g).mul_(coef.to(g.dtype))
    return total.item()
