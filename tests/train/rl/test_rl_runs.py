"""The presets end to end on a tiny model: dynamic sampling's extra rounds, their seeds, and
runs of dr_grpo and dapo through the trainer."""

import json
import os
from unittest import mock

from nanoseek.tasks.rewards import register_reward
from nanoseek.train import grpo_rollouts
from nanoseek.train.grpo import run_grpo
from nanoseek.train.grpo_rollouts import request_seed, sampling
from nanoseek.train.rl import step as rl_step
from tests.train.test_grpo import _opts, model_dir, tok_dir  # noqa: F401 - fixtures


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_extra_rounds_continue_the_seed_index():
    opts = _opts("unused", "unused")
    first = sampling(opts, 4, 7, 3, (0,), 1.0)
    extra = sampling(opts, 4, 7, 3, (0,), 1.0, first=4)
    assert [p.seed for p in first] == [request_seed(7, 3, i) for i in range(4)]
    assert [p.seed for p in extra] == [request_seed(7, 3, i) for i in range(4, 8)]


def test_dynamic_sampling_runs_extra_rounds_until_bounded(model_dir, tmp_path):  # noqa: F811
    # the format reward alone: a random model never writes it, so no group ever has a signal and
    # dynamic sampling runs 1 + max_extra_rounds rounds, each with new prompts
    opts = _opts(model_dir, tmp_path / "d", algorithm="dapo", max_extra_rounds=2, max_steps=1,
                 eval_every=0, rewards={"format": 1.0}, max_completion_length=4)  # fmt: skip
    with mock.patch.object(rl_step, "rollout_round", wraps=grpo_rollouts.rollout_round) as spy:
        last = run_grpo(opts, progress=False)
    assert [c.args[2] for c in spy.call_args_list] == [0, 1, 2]
    assert spy.call_args_list[0].args[5].drawn == 3 * opts.prompts_per_step  # the PromptSampler
    assert last["sampling/rounds"] == 3.0 and last["sampling/groups_with_signal"] == 0.0
    assert last["completions_trained"] == 0 and last["skipped_update"] == 1.0


def test_without_dynamic_sampling_one_round_per_step(model_dir, tmp_path):  # noqa: F811
    # GRPO (the default) with no group ever having a signal: still one round of P prompts
    opts = _opts(model_dir, tmp_path / "g", max_steps=2, eval_every=0, rewards={"format": 1.0},
                 max_completion_length=4, max_extra_rounds=5)  # fmt: skip
    with mock.patch.object(rl_step, "rollout_round", wraps=grpo_rollouts.rollout_round) as spy:
        last = run_grpo(opts, progress=False)
    assert [c.args[1:3] for c in spy.call_args_list] == [(0, 0), (1, 0)]  # (step, round)
    assert spy.call_args_list[0].args[5].drawn == 2 * opts.prompts_per_step
    assert "sampling/rounds" not in last


def test_dapo_trains_on_a_full_batch_of_groups_with_signal(model_dir, tmp_path):  # noqa: F811
    # this random model never stops before max_completion_length, so the overlong filter would
    # mask every completion: it is turned off here (an explicit option over the preset). The
    # first group scored gets one reward for all its completions (no signal), so step 1's first
    # round leaves the batch short whatever was sampled; the others score the parity of the
    # completion's length
    calls = []

    def parity_after_the_first_group(problem, completion):
        calls.append(1)
        return 0.0 if len(calls) <= opts.num_generations else float(len(completion) % 2)

    register_reward("test_parity_later", parity_after_the_first_group, overwrite=True)
    opts = _opts(model_dir, tmp_path / "p", algorithm="dapo", max_steps=2, eval_every=0,
                 rewards={"test_parity_later": 1.0}, mask_truncated=False)  # fmt: skip
    last = run_grpo(opts, progress=False)
    rec = _records(opts.out)
    assert len(rec) == 2
    for m in rec:
        assert m["sampling/groups_with_signal"] == opts.prompts_per_step
        # the batch: exactly prompts_per_step groups of num_generations, whatever was sampled
        assert m["completions_trained"] == opts.prompts_per_step * opts.num_generations
        assert m["sampling/rounds"] >= 1
    # step 1's first round (2 groups) had one without a signal: another round filled the batch
    assert rec[0]["frac_reward_zero_std"] > 0 and rec[0]["sampling/rounds"] >= 2.0
    assert "loss" in last and "clip_ratio/high_mean" in last


def test_dr_grpo_runs(model_dir, tmp_path):  # noqa: F811
    opts = _opts(model_dir, tmp_path / "r", algorithm="dr_grpo", max_steps=1, eval_every=0)
    last = run_grpo(opts, progress=False)
    assert "loss" in last and "sampling/rounds" not in last
