"""RL algorithms as configurations of the pieces: an `RLConfig` names a baseline and a scale
(advantages.py), a policy loss (policy_loss.py), a loss normalisation (normalization.py) and the
group filters and sampling (filters.py, dynamic_sampling.py). An algorithm is a registered
`RLConfig`; `--algorithm NAME` picks it, and any option given explicitly overrides its value.

- "grpo" (the default): GRPO as nanoseek has always run it [DeepSeekMath §4.1; R1 §2.2.1, eq. 1-3]:
  group-normalised advantages (r - mean) / (std + 1e-4), the symmetric clipped surrogate
  (eps 0.2), no KL term (beta 0, TRL's default; the papers' beta > 0 is `--beta`), zero-std groups
  dropped, and token-level normalisation (DAPO's and TRL's; `--loss_norm=sequence` is the papers'
  per-completion mean).
- "dr_grpo" [Liu et al. 2025, "Understanding R1-Zero-Like Training" §3.1]: advantages r - mean
  (no std), token sums over a constant (completions x max_completion_length).
- "dapo" [Yu et al. 2025]: clip-higher eps_high 0.28 (§3.1), dynamic sampling (§3.2),
  token-level normalisation (§3.3), overlong filtering (§3.4).

Adding an algorithm: `ALGORITHMS.register("mine", RLConfig(baseline="leave_one_out", ...))`,
registering any new piece it names in its own registry first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nanoseek.train.rl.advantages import BASELINES, SCALES
from nanoseek.train.rl.filters import FILTERS
from nanoseek.train.rl.normalization import NORMS
from nanoseek.train.rl.policy_loss import POLICY_LOSSES
from nanoseek.train.rl.registry import Registry


@dataclass(frozen=True)
class RLConfig:
    baseline: str = "group_mean"  # advantages.BASELINES
    scale_rewards: str = "group"  # advantages.SCALES: group | batch | none
    policy_loss: str = "clipped"  # policy_loss.POLICY_LOSSES
    loss_norm: str = "token"  # normalization.NORMS: token | sequence | constant
    epsilon: float = 0.2  # clip range 1 - epsilon ...
    epsilon_high: float | None = None  # ... 1 + epsilon_high; None: epsilon (symmetric)
    beta: float = 0.0  # k3 KL coefficient
    drop_zero_std: bool = True  # the "zero_std" filter
    mask_truncated: bool = False  # the "truncated" filter (overlong filtering)
    dynamic_sampling: bool = False  # sample more rounds until the batch has P groups with signal
    max_extra_rounds: int = 8  # ... at most this many rounds beyond the first

    @property
    def filters(self) -> tuple[str, ...]:
        """Active group filters; dynamic sampling trains only on groups with a signal."""
        names = ("zero_std",) if self.drop_zero_std or self.dynamic_sampling else ()
        return names + (("truncated",) if self.mask_truncated else ())

    def validate(self) -> None:
        """ValueError naming the option when a name is unknown or a number out of range."""
        for option, registry in (("baseline", BASELINES), ("scale_rewards", SCALES),
                                 ("policy_loss", POLICY_LOSSES), ("loss_norm", NORMS)):  # fmt: skip
            if getattr(self, option) not in registry:
                raise ValueError(
                    f"option '{option}' must be one of {registry.names()}, "
                    f"got {getattr(self, option)!r}"
                )
        for name in self.filters:
            FILTERS.get(name)
        if not 0 < self.epsilon < 1:
            raise ValueError("option 'epsilon' must be in (0, 1)")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ValueError("option 'epsilon_high' must be > 0")
        if self.beta < 0:
            raise ValueError("option 'beta' must be >= 0")
        if self.max_extra_rounds < 0:
            raise ValueError("option 'max_extra_rounds' must be >= 0")


ALGORITHMS: Registry[RLConfig] = Registry("algorithm")
ALGORITHMS.register("grpo", RLConfig())
ALGORITHMS.register("dr_grpo", RLConfig(scale_rewards="none", loss_norm="constant"))
ALGORITHMS.register("dapo", RLConfig(epsilon_high=0.28, mask_truncated=True, dynamic_sampling=True))


def resolve(algorithm: str, options: object) -> RLConfig:
    """The named algorithm's RLConfig with every field that `options` sets (not None) on top.
    ValueError for an unknown algorithm or piece."""
    base = ALGORITHMS.get(algorithm)
    given = {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(RLConfig)
        if getattr(options, f.name, None) is not None
    }
    cfg = dataclasses.replace(base, **given)
    cfg.validate()
    return cfg
