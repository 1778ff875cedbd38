"""Advantage estimators: one reward per completion -> one advantage per completion.

Rewards come grouped: B = P prompts x G completions, rows g*G .. g*G+G-1 answer prompt g. An
estimator is a *baseline* subtracted within each group, then a *scale*:

- baseline "group_mean": r_i - mean_j r_j, the group mean as the value estimate, no critic
  [DeepSeekMath §4.1.2; R1 §2.2.1, eq. 3].
- baseline "leave_one_out": r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean), RLOO's baseline
  [Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"]: the baseline does not contain the
  sample it is subtracted from, so the estimate is unbiased.
- scale "group": divide by the group's std (Bessel-corrected, torch's default) + 1e-4 (TRL's eps,
  keeps a near-zero std from blowing up), as GRPO's eq. 3; "batch": by the std of the whole batch
  (Liu et al. 2025b, "Tricks or Traps?", Lite PPO); "none": not at all (Dr. GRPO [Liu et al. 2025,
  "Understanding R1-Zero-Like Training" §3.1]: dividing by the group std up-weights prompts that
  are nearly all right or all wrong, a question-level difficulty bias).

A group whose G rewards are all equal has std 0 and gives every completion advantage 0 under
every estimator here: it carries no signal (`zero_std`, see filters.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanoseek.train.rl.registry import Registry

STD_EPS = 1e-4

Baseline = Callable[[torch.Tensor], torch.Tensor]  # rewards [P,G] -> centred rewards [P,G]
# (centred [P,G], rewards [P,G], group std [P], eps) -> advantages [P,G]
Scale = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

BASELINES: Registry[Baseline] = Registry("advantage baseline")
SCALES: Registry[Scale] = Registry("advantage scale")


@BASELINES.add("group_mean")
def group_mean(r: torch.Tensor) -> torch.Tensor:
    return r - r.mean(dim=1, keepdim=True)


@BASELINES.add("leave_one_out")
def leave_one_out(r: torch.Tensor) -> torch.Tensor:
    G = r.shape[1]
    return r - (r.sum(dim=1, keepdim=True) - r) / (G - 1)


@SCALES.add("group")
def by_group_std(adv, r, std, eps):
    return adv / (std[:, None] + eps)


@SCALES.add("batch")
def by_batch_std(adv, r, std, eps):
    batch_std = r.std() if r.numel() > 1 else r.new_zeros(())
    return adv / (batch_std + eps)


@SCALES.add("none")
def unscaled(adv, r, std, eps):
    return adv


@dataclass
class Advantages:
    values: torch.Tensor  # [B] fp32, one per completion
    std: torch.Tensor  # [P] the reward std of each group
    zero_std: torch.Tensor  # [P] bool: all G rewards equal (no signal)


def estimate_advantages(
    rewards: torch.Tensor,
    group_size: int,
    baseline: str = "group_mean",
    scale: str = "group",
    eps: float = STD_EPS,
) -> Advantages:
    """rewards [B] (grouped rows) -> Advantages, with the named baseline and scale."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    base, sc = BASELINES.get(baseline), SCALES.get(scale)
    r = rewards.float().view(-1, group_size)  # [P,G]
    std = group_std(r)
    adv = sc(base(r), r, std, eps)
    return Advantages(adv.reshape(-1), std, torch.isclose(std, torch.zeros_like(std)))


def group_std(r: torch.Tensor) -> torch.Tensor:
    """[P,G] -> [P] Bessel-corrected std per group (0 for groups of one)."""
    return r.std(dim=1) if r.shape[1] > 1 else torch.zeros(r.shape[0])
