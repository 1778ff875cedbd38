"""The RL objective of one micro-batch: the configured policy loss and KL per token
(policy_loss.py), reduced by the configured normalisation (normalization.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.train.rl.algorithms import RLConfig
from nanoseek.train.rl.normalization import BatchCounts, normalise
from nanoseek.train.rl.policy_loss import TokenLoss, token_loss


@dataclass
class Objective:
    loss: torch.Tensor  # scalar to minimise, in the loop's units (normalization.py)
    tokens: TokenLoss  # the per-token terms, for metrics


def rl_objective(
    cfg: RLConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    counts: BatchCounts | None = None,
) -> Objective:
    """logp/old_logp/ref_logp/mask [B,T] (mask: completion tokens that take loss), advantages [B];
    counts: the whole step's batch when this is one micro-batch of it (None: this batch alone)."""
    t = token_loss(logp, old_logp, advantages, policy_loss=cfg.policy_loss, epsilon=cfg.epsilon,
                   epsilon_high=cfg.epsilon_high, ref_logp=ref_logp, beta=cfg.beta)  # fmt: skip
    return Objective(normalise(cfg.loss_norm, t.per_token, mask.to(logp.dtype), counts), t)
