"""Expert-parallel dispatch on 2 gloo ranks against the single-process RoutedExperts.

Uneven token counts per rank, an expert no token chooses, a rank that receives no rows at all,
and a rank that sends all its rows away: forward outputs and every gradient (inputs, gate
weights, the local expert slice) must match the reference on the concatenated tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanoseek.model.moe import RoutedExperts
from tests.dist.launch import spawn

E, D, F, K = 4, 16, 8, 2  # experts 0,1 live on rank 0; 2,3 on rank 1


def _indices(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


# per rank: the experts of each token (K distinct per row)
SCENARIOS = {
    # 5 vs 3 tokens; expert 3 chosen by nobody
    "uneven, idle expert": ([[0, 1], [1, 2], [0, 2], [2, 1], [0, 1]], [[1, 0], [2, 0], [1, 2]]),
    # rank 1 gets no rows (nobody picks 2 or 3); rank 1 sends everything to rank 0
    "rank 1 receives nothing": ([[0, 1], [1, 0]], [[0, 1], [1, 0], [0, 1]]),
    # rank 0 sends everything away and keeps nothing for itself
    "rank 0 sends all away": ([[2, 3], [3, 2], [2, 3]], [[3, 2]]),
}


def _worker(rank: int, world_size: int) -> None:
    from nanoseek.dist.expert_parallel import ExpertParallelExperts
    from nanoseek.dist.parallel import shutdown

    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        full = RoutedExperts(E, D, F)
        torch.nn.init.normal_(full.gate_up_proj, 0, 0.3)
        torch.nn.init.normal_(full.down_proj, 0, 0.3)
        hook_calls = []
        for name, (idx0, idx1) in SCENARIOS.items():
            for impl in ("grouped", "looped"):
                idx = [_indices(idx0), _indices(idx1)]
                n = [len(idx0), len(idx1)]
                g = torch.Generator().manual_seed(1)
                x = torch.randn(sum(n), D, generator=g, requires_grad=True)
                w = torch.rand(sum(n), K, generator=g, requires_grad=True)
                dy = torch.randn(sum(n), D, generator=g)
                # reference: one process, all tokens
                full.zero_grad()
                ref = full(x, torch.cat(idx), w)
                (ref * dy).sum().backward()
                # this rank's tokens through the expert-parallel module, which keeps the
                # replaced module's GEMM hook (nanoseek/fp8 sets one)
                ep = ExpertParallelExperts(full, dist.group.WORLD)
                assert ep.linear_fn is full.linear_fn
                ep.linear_fn = lambda x, w, offs, f=ep.linear_fn: (
                    hook_calls.append(1) or f(x, w, offs)
                )
                mine = slice(0, n[0]) if rank == 0 else slice(n[0], sum(n))
                x_r = x.detach()[mine].clone().requires_grad_()
                w_r = w.detach()[mine].clone().requires_grad_()
                y = ep(x_r, idx[rank], w_r, impl=impl)
                (y * dy[mine]).sum().backward()
                local = slice(ep.first, ep.first + ep.n_local)
                what = f"{name} ({impl}) rank {rank}"
                torch.testing.assert_close(y, ref.detach()[mine], msg=f"output: {what}")
                torch.testing.assert_close(x_r.grad, x.grad[mine], msg=f"dx: {what}")
                torch.testing.assert_close(w_r.grad, w.grad[mine], msg=f"dw: {what}")
                torch.testing.assert_close(
                    ep.gate_up_proj.grad, full.gate_up_proj.grad[local], msg=f"gate_up: {what}"
                )
                torch.testing.assert_close(
                    ep.down_proj.grad, full.down_proj.grad[local], msg=f"down: {what}"
                )
                x.grad = w.grad = None
        assert hook_calls, "the grouped path never called linear_fn"
    except BaseException:
        shutdown(synchronize=False)
        raise
    shutdown(synchronize=True)


def test_dispatch_matches_single_process_with_uneven_and_empty_experts():
    spawn(_worker, 2, timeout=90)
