"""Expert parallelism: each rank of an ep group holds E/ep routed experts [V3 §3.2.2].

Shape legend: N local tokens, D model dim, K experts per token, M = N*K local token-expert pairs,
E routed experts, El = E/ep local experts, P = ep ranks, R pairs received, F expert width.

`ExpertParallelExperts` replaces `MoE.experts` (a `RoutedExperts`) and keeps its call signature
and parameter names, so the router, shared experts, balancing and checkpoint names are untouched:
1. dispatch: sort the M pairs by expert - experts are laid out rank-major, so that also sorts
   them by destination rank; exchange the per-expert counts [P, El] with one all_to_all_single;
   one host sync turns them into split sizes; all_to_all the rows with the autograd-aware
   functional collective (its backward is the reverse exchange);
2. compute: received rows arrive grouped by source rank; regroup them by local expert and run
   the SwiGLU with the replaced module's `linear_fn` (its grouped GEMM, or the FP8 one that
   nanoseek/fp8 hooks in: hook before `parallelize`, the swap carries it over);
3. combine: undo the regrouping, all_to_all back, weight by the gate, scatter-add per token.
No capacity limit, no token dropping: the same function as the single-process module.

Footgun: every rank must run both exchanges in forward and backward even when it sends or
receives nothing, or its peers wait forever; empty tensors keep the graph connected, and an
expert with no tokens still gets a (zero) gradient, as in the single-process module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import RoutedExperts


class ExpertParallelExperts(nn.Module):
    """Experts [first, first + El) of E; `gate_up_proj` [El,2F,D], `down_proj` [El,D,F]."""

    all_local = False  # the other experts live on the other ranks: no `MoE.forward_few`

    def __init__(self, experts: RoutedExperts, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.ep_size, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_experts, self.hidden = experts.n_experts, experts.hidden
        if self.n_experts % self.ep_size:
            raise ValueError(f"{self.ep_size} ranks do not divide {self.n_experts} experts")
        self.n_local = self.n_experts // self.ep_size
        self.first = self.ep_rank * self.n_local
        local = slice(self.first, self.first + self.n_local)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[local].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[local].clone())
        # (x [R,in] sorted by expert, w [El,out,in], offs [El] int32 block ends) -> [R,out]
        self.linear_fn = getattr(experts, "linear_fn", _grouped_linear)

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.n_local - 1} of {self.n_experts}"

    def forward(self, x, indices, weights, impl: str = "grouped"):
        """x [N,D], indices [N,K], weights [N,K] fp32 -> y [N,D] = sum_k w_k * expert_k(x)."""
        P, El = self.ep_size, self.n_local
        N, K = indices.shape
        flat = indices.reshape(-1)  # [M]
        order = flat.argsort(stable=True)  # pairs sorted by expert, hence by destination rank
        token = order // K  # [M] source token of each sorted pair
        send_counts = torch.bincount(flat, minlength=self.n_experts)  # [E] = [P*El]
        recv_counts = torch.empty_like(send_counts)  # [P*El]: from rank p for local expert e
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # the one host sync: split sizes per peer, both directions
        send_split, recv_split = (
            torch.stack([send_counts.view(P, El).sum(1), recv_counts.view(P, El).sum(1)])
            .cpu()
            .tolist()
        )
        recv = _all_to_all(x[token], recv_split, send_split, self.group)  # [R,D]

        # received rows come grouped by (source rank, local expert): regroup by local expert
        R = sum(recv_split)
        local_ids = torch.arange(El, device=x.device).repeat(P)  # [P*El]
        expert_of_row = local_ids.repeat_interleave(recv_counts, output_size=R)  # [R]
        perm = expert_of_row.argsort(stable=True)  # [R]
        per_expert = recv_counts.view(P, El).sum(0)  # [El]
        h = self._swiglu(recv[perm], per_expert, impl)  # [R,D]
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(R, device=x.device)
        back = _all_to_all(h[inverse], send_split, recv_split, self.group)  # [M,D]

        back = back * weights.reshape(-1)[order, None].to(back.dtype)
        return torch.zeros_like(x).index_add_(0, token, back.to(x.dtype))

    def _swiglu(self, xs, counts, impl: str):
        """xs [R,D] sorted by local expert (counts [El]) -> [R,D]."""
        if impl == "looped" or xs.shape[0] == 0:
            # the reference path; also taken for no rows at all, where the grouped GEMM's
            # backward rejects the empty input (an expert with no rows is fine there)
            out = []
            for e, rows in enumerate(xs.split(counts.tolist())):
                w1, w2 = self.gate_up_proj[e].to(rows.dtype), self.down_proj[e].to(rows.dtype)
                gate, up = F.linear(rows, w1).split(self.hidden, dim=-1)
                out.append(F.linear(F.silu(gate) * up, w2))
            return torch.cat(out, dim=0)
        offs = counts.cumsum(0).to(torch.int32)
        h = self.linear_fn(xs, self.gate_up_proj, offs)  # [R,2F]
        gate, up = h.split(self.hidden, dim=-1)
        return self.linear_fn(F.silu(gate) * up, self.down_proj, offs)  # [R,D]


def _grouped_linear(x, w, offs):
    """x [R,in] sorted by expert (offs: block ends), w [El,out,in] -> [R,out]: one
    torch._grouped_mm where it applies (bf16/fp32, 16-byte row strides; on CUDA
    sm90+), else one GEMM per expert. Used when the replaced experts declare no `linear_fn`."""
    w_t = w.transpose(1, 2).to(x.dtype)  # [El,in,out]; a view unless autocast-like casting
    ok = (
        hasattr(torch, "_grouped_mm")
        and x.dtype in (torch.float32, torch.bfloat16)
        and (x.shape[-1] * x.element_size()) % 16 == 0
        and (w_t.shape[-1] * x.element_size()) % 16 == 0
        and (x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (9, 0))
    )
    if ok:
        return torch._grouped_mm(x, w_t, offs=offs)
    counts = offs.diff(prepend=offs.new_zeros(1))
    return torch.cat([p @ w_t[e] for e, p in enumerate(x.split(counts.tolist()))], dim=0)


def _all_to_all(x: torch.Tensor, out_split: list[int], in_split: list[int], group):
    """Rows of x [sum(in_split), D] to peers; autograd-aware (backward = the reverse exchange)."""
    # an AsyncCollectiveTensor: the next op on it waits (an explicit .wait() would return the
    # inner tensor, outside the autograd graph)
    return funcol.all_to_all_single_autograd(x.contiguous(), out_split, in_split, group)


def shard_experts(model: nn.Module, ep_group: dist.ProcessGroup) -> list[ExpertParallelExperts]:
    """Swap every MoE's `experts` for the rank's slice (the model's full experts are dropped)."""
    swapped = []
    for moe in model.moe_layers():
        if isinstance(moe.experts, RoutedExperts):
            moe.experts = ExpertParallelExperts(moe.experts, ep_group)
            swapped.append(moe.experts)
    return swapped
