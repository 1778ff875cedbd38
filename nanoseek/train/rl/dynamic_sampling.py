"""DAPO's dynamic sampling [Yu et al. 2025, DAPO §3.2]: over-sample, keep the groups whose
rewards differ, and sample more rounds until the batch holds `want` such groups.

Without it, a batch whose prompts are mostly solved (or mostly hopeless) trains on few groups:
the gradient gets noisier as the policy improves. With it every step trains on `want` groups
with a signal, at the cost of extra rollout rounds; `max_extra_rounds` bounds that cost (DAPO's
implementation bounds the number of generation batches the same way), after which the step
trains on what it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

G = TypeVar("G")  # a group: whatever the sampler returns per prompt


@dataclass
class Filled(Generic[G]):
    groups: list[G]  # every group sampled, in order (metrics describe all of them)
    chosen: list[int]  # indices into `groups`: the first `want` with a signal, in order
    rounds: int  # rollout rounds run (1 = no extra round)


def sample_until_full(
    sample_round: Callable[[int], Sequence[G]],
    has_signal: Callable[[G], bool],
    want: int,
    max_extra_rounds: int,
) -> Filled[G]:
    """Call `sample_round(k)` for k = 0, 1, ... until `want` groups have a signal or
    1 + max_extra_rounds rounds ran; choose the first `want` groups with a signal."""
    groups: list[G] = []
    signal: list[int] = []
    rounds = 0
    while rounds <= max_extra_rounds and len(signal) < want:
        new = list(sample_round(rounds))
        signal += [len(groups) + i for i, g in enumerate(new) if has_signal(g)]
        groups += new
        rounds += 1
    return Filled(groups, signal[:want], rounds)
