"""Learning-rate and coefficient schedules, as pure functions of the step.

V3 §4.2 warms up, holds, then decays (cosine); warmup-stable-decay (WSD) keeps the peak until a
final fraction of training and decays there, which lets a run be extended without a restart.
"""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    peak: float,
    total: int,
    warmup: int,
    kind: str = "cosine",
    min_ratio: float = 0.1,
    decay_frac: float = 0.2,
) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * min_ratio
    if kind == "constant":
        return peak
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_start = total - int(decay_frac * total)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return floor + (peak - floor) * (1 - progress)
    raise ValueError(f"lr schedule must be 'cosine', 'wsd' or 'constant', got {kind!r}")


def piecewise(step: int, total: int, first: float, second: float, switch_frac: float) -> float:
    """`first` for the first `switch_frac` of training, then `second`: V3's MTP weight
    (0.3 for the first 10T of 14.8T tokens, then 0.1) and its bias speed (0.001, then 0)."""
    return first if step < switch_frac * total else second
