"""Advantage estimators against hand-computed numbers (rl/advantages.py)."""

import math

import pytest
import torch

from nanoseek.train.rl.advantages import BASELINES, SCALES, estimate_advantages

# two groups of G = 4: a hard prompt (1 of 4 right) and an easy one (3 of 4 right)
R = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])


def test_grpo_group_normalised():
    # group 1: mean 0.25, deviations (0.75, -0.25, -0.25, -0.25), squares sum to 0.75,
    # Bessel std = sqrt(0.75 / 3) = 0.5 -> (1.5, -0.5, -0.5, -0.5); group 2 is its mirror image
    a = estimate_advantages(R, 4, "group_mean", "group", eps=0.0)
    torch.testing.assert_close(a.values, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -1.5]))
    torch.testing.assert_close(a.std, torch.tensor([0.5, 0.5]))
    assert a.zero_std.tolist() == [False, False]
    # the default eps (TRL's 1e-4) sits in the denominator: 0.75 / (0.5 + 1e-4)
    assert estimate_advantages(R, 4).values[0].item() == pytest.approx(0.75 / 0.5001, abs=1e-7)


def test_dr_grpo_mean_centred_only():
    # no std: the deviations themselves, so a prompt's advantages do not grow as its std shrinks
    a = estimate_advantages(R, 4, "group_mean", "none")
    torch.testing.assert_close(
        a.values, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75])
    )


def test_difficulty_bias_of_the_std_scale():
    # 1 of 4 right vs 2 of 4 right: the right answer's advantage. Group std: 0.5 vs
    # sqrt(4 * 0.25 / 3) = 0.577; GRPO: 0.75 / 0.5 = 1.5 vs 0.5 / 0.577 = 0.866 (ratio 1.73),
    # Dr. GRPO: 0.75 vs 0.5 (ratio 1.5, the deviations alone)
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    g = estimate_advantages(r, 4, scale="group", eps=0.0).values
    d = estimate_advantages(r, 4, scale="none").values
    assert g[4].item() == pytest.approx(0.5 / math.sqrt(1 / 3))
    assert (g[0] / g[4]).item() == pytest.approx(1.5 / (0.5 / math.sqrt(1 / 3)))
    assert (d[0] / d[4]).item() == pytest.approx(1.5)


def test_rloo_leave_one_out():
    # group 1: 1 - mean(0, 0, 0) = 1; 0 - mean(1, 0, 0) = -1/3 (= 4/3 x the group-mean deviation)
    # group 2: 1 - mean(1, 1, 0) = 1/3; 0 - mean(1, 1, 1) = -1
    a = estimate_advantages(R, 4, "leave_one_out", "none")
    t = 1 / 3
    torch.testing.assert_close(a.values, torch.tensor([1, -t, -t, -t, t, t, t, -1.0]))
    assert abs(a.values.view(2, 4).sum(1)).max() < 1e-6  # still zero-sum per group


def test_batch_std_scale():
    # 8 rewards, four 1s: mean 0.5, every deviation +-0.5, Bessel var = 8 x 0.25 / 7 = 2/7
    a = estimate_advantages(R, 4, scale="batch", eps=0.0)
    dev = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75])
    torch.testing.assert_close(a.values, dev / math.sqrt(2 / 7))


def test_zero_std_groups_get_zero_advantage_under_every_estimator():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    for base in BASELINES.names():
        for scale in SCALES.names():
            a = estimate_advantages(r, 3, base, scale)
            assert a.zero_std.tolist() == [True, False]
            assert a.values[:3].abs().max() == 0.0, (base, scale)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid: group_mean, leave_one_out"):
        estimate_advantages(R, 4, baseline="median")
    with pytest.raises(ValueError, match="valid: batch, group, none"):
        estimate_advantages(R, 4, scale="max")
    with pytest.raises(ValueError, match="groups of 3"):
        estimate_advantages(R, 3)
