"""Group filters and the selection of a step's completions (rl/filters.py)."""

import torch

from nanoseek.train.rl.algorithms import RLConfig
from nanoseek.train.rl.filters import FILTERS, Scored, keep_mask, select

# G = 4: group 0 has a signal, group 1 is all 0; completions 1 and 7 hit the length limit
R = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
TRUNC = torch.tensor([False, True, False, False, False, False, False, True])
S = Scored(R, 4, torch.tensor([False, True]), TRUNC)


def test_each_filter_and_their_conjunction():
    T, F = True, False
    assert keep_mask(S, ["zero_std"]).tolist() == [T, T, T, T, F, F, F, F]
    assert keep_mask(S, ["truncated"]).tolist() == [T, F, T, T, T, T, T, F]
    assert keep_mask(S, ["zero_std", "truncated"]).tolist() == [T, F, T, T, F, F, F, F]
    assert keep_mask(S, []).all()


def test_select_per_config():
    # GRPO: group 0's advantages use all four rewards, the truncated one's included:
    # mean 0.75, deviations (0.25, 0.25, -0.75, 0.25), std 0.5 -> (0.5, 0.5, -1.5, 0.5)
    grpo = select(RLConfig(), R, 4, TRUNC)
    assert grpo.keep.tolist() == [True] * 4 + [False] * 4
    torch.testing.assert_close(
        grpo.advantages.values[:4], torch.tensor([0.25, 0.25, -0.75, 0.25]) / (0.5 + 1e-4)
    )
    # overlong filtering drops completion 1 from the loss, not from its group's statistics
    dapo_like = select(RLConfig(mask_truncated=True), R, 4, TRUNC)
    assert dapo_like.keep.tolist() == [True, False, True, True] + [False] * 4
    torch.testing.assert_close(dapo_like.advantages.values, grpo.advantages.values)
    # no filter at all: every completion, group 1 with advantage 0
    everything = select(RLConfig(drop_zero_std=False), R, 4, TRUNC)
    assert everything.keep.all() and everything.advantages.values[4:].abs().max() == 0
    # dynamic sampling's chosen groups restrict the batch further
    assert not select(RLConfig(), R, 4, TRUNC, chosen=[1]).keep.any()


def test_a_new_filter_is_one_register_call():
    FILTERS.register("test_no_zero_reward", lambda s: s.rewards != 0, overwrite=True)
    keep = keep_mask(S, ["test_no_zero_reward", "truncated"])
    assert keep.tolist() == [True, False, False, True, False, False, False, False]
