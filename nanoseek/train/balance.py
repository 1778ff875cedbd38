"""Auxiliary-loss-free load balancing [V3 §2.1.2; Wang et al. arXiv 2408.15664].

After each optimizer step - after all gradient-accumulation micro-batches, and (under
torch.distributed) after summing the counts of every rank - each MoE layer, the MTP modules'
included, moves its routing bias toward balance:
    b_i += gamma * sign(mean_j load_j - load_i)
Overloaded experts become less attractive for *selection* only (the bias never enters the gate
weights, eq. 16). The bias is a buffer, not a parameter: the optimizer never sees it. Counts are
int64 and the bias fp32, so neither rounds.
"""

from __future__ import annotations

import torch

from nanoseek.model.moe import MoE, max_violation


def start_counting(moes: list[MoE]) -> None:
    """Zero the counters and count real training tokens from now on."""
    for moe in moes:
        moe.expert_load.zero_()
        moe.count_load = True


def gather_loads(moes: list[MoE], all_reduce=None) -> list[torch.Tensor]:
    """Per-layer expert loads [E] (int64) of the whole step; `all_reduce` sums across ranks."""
    loads = [moe.expert_load.clone() for moe in moes]
    if all_reduce is not None and loads:
        flat = torch.stack(loads)
        all_reduce(flat)
        loads = list(flat.unbind(0))
    return loads


@torch.no_grad()
def update_bias(moes: list[MoE], loads: list[torch.Tensor], gamma: float) -> None:
    """The sign rule above, then zero the counters for the next step."""
    for moe, load in zip(moes, loads):
        if gamma > 0 and load.sum() > 0:
            mean = load.double().mean()
            step = torch.sign(mean - load.double()).float() * gamma
            # keep the bias centred (torchtitan does the same): only differences matter for
            # selection, and a drifting mean would slowly eat fp32 precision
            moe.gate.e_score_correction_bias += step - step.mean()
        moe.expert_load.zero_()


def load_stats(loads: list[torch.Tensor]) -> dict:
    """MaxVio per layer and over the summed load, plus the loads, for metrics.jsonl."""
    per_layer = [max_violation(load) for load in loads]
    total = torch.stack(loads).sum(0) if loads else torch.zeros(1)
    return {
        "maxvio": max(per_layer) if per_layer else 0.0,
        "maxvio_mean": sum(per_layer) / len(per_layer) if per_layer else 0.0,
        "maxvio_global": max_violation(total),
        "maxvio_per_layer": per_layer,
        "expert_load": [load.tolist() for load in loads],
    }
