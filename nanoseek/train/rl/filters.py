"""Group filters: which sampled completions take loss.

A filter sees the step's scored rollouts and returns a keep mask over completions; the trainer
keeps the completions every active filter keeps.

- "zero_std": drop the groups whose G rewards are all equal [DAPO §3.2]: their advantages are
  all 0, so under "token" normalisation they only dilute the batch (and cost a forward and
  backward).
- "truncated": overlong filtering [DAPO §3.4]: a completion cut off at max_completion_length
  takes no loss, since its reward (usually 0 for a missing answer) punishes reasoning that may
  have been sound, only long. Its reward still counts towards its group's advantages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanoseek.train.rl.advantages import Advantages, estimate_advantages
from nanoseek.train.rl.registry import Registry

if TYPE_CHECKING:  # algorithms.py imports this module (its registry) at run time
    from nanoseek.train.rl.algorithms import RLConfig


@dataclass
class Scored:
    """The step's rollouts as the filters see them (grouped rows, as in advantages.py)."""

    rewards: torch.Tensor  # [B]
    group_size: int
    zero_std: torch.Tensor  # [B/G] bool: the group's rewards are all equal
    truncated: torch.Tensor  # [B] bool: stopped by max_completion_length, not by eos


Filter = Callable[[Scored], torch.Tensor]  # -> keep [B] bool
FILTERS: Registry[Filter] = Registry("group filter")


@FILTERS.add("zero_std")
def has_signal(s: Scored) -> torch.Tensor:
    return (~s.zero_std).repeat_interleave(s.group_size)


@FILTERS.add("truncated")
def not_truncated(s: Scored) -> torch.Tensor:
    return ~s.truncated


def keep_mask(s: Scored, names: list[str] | tuple[str, ...]) -> torch.Tensor:
    """[B] bool: the completions that every named filter keeps."""
    keep = torch.ones(s.rewards.numel(), dtype=torch.bool)
    for name in names:
        keep &= FILTERS.get(name)(s)
    return keep


@dataclass
class Selection:
    advantages: Advantages  # of every sampled completion
    keep: torch.Tensor  # [B] bool: the completions that take loss


def select(
    cfg: RLConfig,
    rewards: torch.Tensor,
    group_size: int,
    truncated: torch.Tensor,
    chosen: list[int] | None = None,
) -> Selection:
    """A step's rollouts -> advantages (the configured estimator, over every sampled completion)
    and the completions that take loss: those the configured filters keep and, when `chosen`
    names groups (dynamic sampling's batch), only those groups."""
    adv = estimate_advantages(rewards, group_size, cfg.baseline, cfg.scale_rewards)
    keep = keep_mask(Scored(rewards, group_size, adv.zero_std, truncated), cfg.filters)
    if chosen is not None:
        in_batch = torch.zeros(adv.zero_std.numel(), dtype=torch.bool)
        in_batch[chosen] = True
        keep &= in_batch.repeat_interleave(group_size)
    return Selection(adv, keep)
