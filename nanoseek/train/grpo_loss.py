"""GRPO's loss as one call, for code and tests that predate the RL core (nanoseek/train/rl/):
`group_advantages`, `grpo_loss` and `reduce_tokens` compose its pieces with GRPO's defaults.

Shape legend: B completions (P prompts x G generations, grouped rows), T completion positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.train.rl.advantages import SCALES, STD_EPS, estimate_advantages
from nanoseek.train.rl.logprobs import masked_mean, token_entropy, token_logprobs
from nanoseek.train.rl.normalization import NORMS, BatchCounts, normalise
from nanoseek.train.rl.policy_loss import k3_kl, token_loss

__all__ = ["SCALES", "NORMS", "STD_EPS", "group_advantages", "grpo_loss", "reduce_tokens", "k3_kl",
           "token_logprobs", "token_entropy", "masked_mean", "GRPOLoss"]  # fmt: skip


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = STD_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rewards [B] -> (advantages [B], group std [B/G], zero_std [B/G]): the group-mean baseline
    with the named scale (rl/advantages.py)."""
    if scale not in SCALES:
        raise ValueError(f"advantage scale must be one of {SCALES.names()}, got {scale!r}")
    a = estimate_advantages(rewards, group_size, "group_mean", scale, eps)
    return a.values, a.std, a.zero_std


@dataclass
class GRPOLoss:
    loss: torch.Tensor  # scalar, minimised; normalised as `reduce_tokens` says
    ratio: torch.Tensor  # [B,T] rho (detached)
    kl: torch.Tensor | None  # [B,T] k3 per token (detached); None when beta == 0
    clipped_low: torch.Tensor  # [B,T] bool: rho < 1 - eps with A < 0 (the min picks the clip)
    clipped_high: torch.Tensor  # [B,T] bool: rho > 1 + eps_high with A > 0


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    norm: str = "token",
    n_tokens: float | None = None,
    n_seqs: float | None = None,
) -> GRPOLoss:
    """The clipped surrogate with the k3 penalty, reduced to the batch loss (or, given the whole
    batch's n_tokens / n_seqs, this micro-batch's share of it: see `reduce_tokens`)."""
    t = token_loss(logp, old_logp, advantages, epsilon=epsilon, epsilon_high=epsilon_high,
                   ref_logp=ref_logp, beta=beta)  # fmt: skip
    loss = reduce_tokens(t.per_token, mask.to(logp.dtype), norm, n_tokens, n_seqs)
    return GRPOLoss(loss, t.ratio, t.kl, t.clipped_low, t.clipped_high)


def reduce_tokens(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    norm: str = "token",
    n_tokens: float | None = None,
    n_seqs: float | None = None,
) -> torch.Tensor:
    """[B,T] -> this batch's share of the loss of a batch with n_tokens tokens / n_seqs completions
    (default: this batch's own counts, i.e. the batch loss)."""
    if norm not in NORMS:
        raise ValueError(f"loss normalisation must be one of {NORMS.names()}, got {norm!r}")
    if n_tokens is None and n_seqs is None:
        return normalise(norm, per_token, mask)
    m = mask.to(per_token.dtype)
    n_mb = m.sum().clamp(min=1)
    n_tok = float(n_tokens) if n_tokens is not None else float(n_mb)
    seqs = float(n_seqs) if n_seqs is not None else float((m.sum(1) > 0).sum().clamp(min=1))
    counts = BatchCounts(n_tok, seqs, per_token.shape[0], per_token.shape[1])
    # the normalisers return loop units (share x n_tokens / n_mb): back to the share
    return normalise(norm, per_token, m, counts) * n_mb / n_tok
