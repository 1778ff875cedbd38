"""The presets against hand-computed losses, options that select and override them, and the
default (grpo) bit-identical to the trainer's loss before the RL core existed."""

import dataclasses
import math

import pytest
import torch

from nanoseek.train.grpo import GRPOOptions
from nanoseek.train.options import build
from nanoseek.train.rl.algorithms import ALGORITHMS, RLConfig, resolve
from nanoseek.train.rl.filters import select
from nanoseek.train.rl.normalization import BatchCounts
from nanoseek.train.rl.objective import rl_objective

# ------------------------------------------------------------------------------ presets by hand
# P = 2 prompts x G = 2 completions, up to 3 tokens (max_completion_length 3).
# Group 0: rewards 1, 0 (completion 1 truncated); group 1: rewards 1, 1 (no signal).
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0])
TRUNC = torch.tensor([False, True, False, False])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]])
# every ratio 1 except completion 0's first token: 1.25 (above 1 + 0.2, below 1 + 0.28)
RATIO = torch.tensor([[1.25, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
# GRPO's advantage for group 0: +-0.5 / (std + 1e-4), std = sqrt(0.5) (Bessel, two samples)
a = 0.5 / (math.sqrt(0.5) + 1e-4)


def preset_loss(cfg: RLConfig) -> float:
    """The step's composition (rl/step.py) on one micro-batch: select, then the objective."""
    sel = select(cfg, REWARDS, 2, TRUNC)
    k = sel.keep
    old = torch.zeros(4, 3)
    logp = RATIO.log()
    counts = BatchCounts(float(MASK[k].sum()), float(k.sum()), 4.0, 3)
    adv = sel.advantages.values[k]
    return rl_objective(cfg, logp[k], old[k], adv, MASK[k], None, counts).loss.item()


def test_grpo_by_hand():
    # group 1 dropped (zero std). Completion 0 (A = +a): -min(1.25a, 1.2a) = -1.2a, then -a, -a;
    # completion 1 (A = -a, kept: no overlong filter): +a, +a. Token mean: -1.2a / 5 tokens.
    assert preset_loss(ALGORITHMS.get("grpo")) == pytest.approx(-1.2 * a / 5, abs=1e-7)


def test_grpo_with_the_papers_sequence_mean():
    # completion means -3.2a / 3 and 2a / 2, averaged over the 2 completions: -a / 30
    cfg = dataclasses.replace(ALGORITHMS.get("grpo"), loss_norm="sequence")
    assert preset_loss(cfg) == pytest.approx(-a / 30, abs=1e-7)


def test_dr_grpo_by_hand():
    # A = +-0.5 (no std). Completion 0: -0.6, -0.5, -0.5; completion 1: +0.5, +0.5; sum -0.6,
    # over the constant 2 prompts x 2 completions x 3 tokens = 12
    assert preset_loss(ALGORITHMS.get("dr_grpo")) == pytest.approx(-0.6 / 12, abs=1e-7)
    # the dropped no-signal group would add 0 (A = 0, no KL) and the constant does not count
    # completions: dropping it changes nothing
    keep_all = dataclasses.replace(ALGORITHMS.get("dr_grpo"), drop_zero_std=False)
    assert preset_loss(keep_all) == pytest.approx(-0.6 / 12, abs=1e-7)


def test_dapo_by_hand():
    # clip-higher: 1.25 < 1.28 is not clipped (-1.25a); overlong filter: completion 1 takes no
    # loss. Token mean over completion 0 alone: (-1.25a - a - a) / 3
    assert preset_loss(ALGORITHMS.get("dapo")) == pytest.approx(-3.25 * a / 3, abs=1e-7)


# ------------------------------------------------------------------------------ options
def test_default_is_grpo_with_the_previous_defaults():
    cfg = GRPOOptions().rl()
    assert cfg == ALGORITHMS.get("grpo") == RLConfig()
    # the values the trainer used before presets existed
    assert (cfg.baseline, cfg.scale_rewards, cfg.policy_loss, cfg.loss_norm) == (
        "group_mean", "group", "clipped", "token")  # fmt: skip
    assert (cfg.epsilon, cfg.epsilon_high, cfg.beta) == (0.2, None, 0.0)
    assert (cfg.drop_zero_std, cfg.mask_truncated, cfg.dynamic_sampling) == (True, False, False)
    assert cfg.filters == ("zero_std",)


def test_presets_and_explicit_overrides():
    dapo = GRPOOptions(algorithm="dapo").rl()
    assert (dapo.epsilon_high, dapo.mask_truncated, dapo.dynamic_sampling) == (0.28, True, True)
    assert dapo.filters == ("zero_std", "truncated") and dapo.loss_norm == "token"
    dr = GRPOOptions(algorithm="dr_grpo").rl()
    assert (dr.scale_rewards, dr.loss_norm, dr.epsilon_high) == ("none", "constant", None)
    # an option given explicitly wins over the preset, from the command line too
    opts = build(GRPOOptions, None, ["--algorithm=dapo", "--epsilon_high=0.3",
                                     "--mask_truncated=false", "--loss_norm=sequence"])  # fmt: skip
    cfg = opts.rl()
    assert (cfg.epsilon_high, cfg.mask_truncated, cfg.loss_norm) == (0.3, False, "sequence")
    assert cfg.dynamic_sampling  # not overridden: the preset's
    # dynamic sampling trains on groups with a signal even if drop_zero_std is off
    assert dataclasses.replace(cfg, drop_zero_std=False).filters == ("zero_std",)
    # the options that existed before keep their meaning under the default algorithm
    old = GRPOOptions(scale_rewards="batch", loss_norm="sequence", drop_zero_std=False).rl()
    assert (old.scale_rewards, old.loss_norm, old.drop_zero_std) == ("batch", "sequence", False)


def test_bad_names_are_rejected_naming_the_option():
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'; valid: dapo, dr_grpo, grpo"):
        GRPOOptions(algorithm="ppo").rl()
    with pytest.raises(ValueError, match="option 'loss_norm' must be one of"):
        GRPOOptions(loss_norm="mean").rl()
    with pytest.raises(ValueError, match="option 'baseline' must be one of"):
        GRPOOptions(baseline="critic").rl()
    with pytest.raises(ValueError, match="epsilon_high"):
        GRPOOptions(epsilon_high=0.0).rl()
    with pytest.raises(ValueError, match="max_extra_rounds"):
        GRPOOptions(max_extra_rounds=-1).rl()


def test_a_new_algorithm_is_one_register_call():
    # RLOO advantages in the clipped surrogate, sequence-mean loss
    ALGORITHMS.register("test_rloo", RLConfig(baseline="leave_one_out", scale_rewards="none",
                                              loss_norm="sequence"), overwrite=True)  # fmt: skip
    cfg = resolve("test_rloo", GRPOOptions(algorithm="test_rloo"))
    # group 0 leave-one-out: 1 - 0 = 1, 0 - 1 = -1. Completion 0: -1.2, -1, -1 (mean -3.2/3),
    # completion 1: 1, 1 (mean 1): (-3.2/3 + 1) / 2 = -1/30
    assert preset_loss(cfg) == pytest.approx(-1 / 30, abs=1e-7)
