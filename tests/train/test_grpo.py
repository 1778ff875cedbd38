"""GRPO on the shared loop: a tiny end-to-end run, old log-probs, the reference, resume, warnings."""

import contextlib
import json
import os
import time
from unittest import mock

import pytest
import torch

from nanoseek import CausalLM, load, save
from nanoseek.checkpoint.trainer_state import checkpoint_dirs
from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.data.corpus import generate_corpus
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer
from nanoseek.tasks.rewards import register_reward
from nanoseek.train import grpo
from nanoseek.train.grpo import GRPOOptions, make_batches, make_loss_fn, run_grpo
from tests.helpers import tiny_config

# A reward with variance even for a random model: GRPO gets a signal to act on.
register_reward("test_parity", lambda p, c: float(len(c) % 2), overwrite=True)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(list(generate_corpus(300, seed=0)), 512, d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok_dir):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=512, num_hidden_layers=2, max_position_embeddings=128)
    model = CausalLM(cfg)
    model.init_weights(std=0.05)  # peaked enough that completions sometimes stop at eos
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("m") / "model"
    files = [os.path.join(tok_dir, f) for f in ("tokenizer.json", "tokenizer_config.json")]
    save(model, path, extra_files=files)
    return str(path)


def _opts(model_dir, out, **kw) -> GRPOOptions:
    base = dict(
        model=model_dir, out=str(out), task=["addition"], task_level=1, max_steps=3,
        prompts_per_step=2, num_generations=4, max_completion_length=12, batch_size=3,
        eval_every=2, eval_n=4, save_every=2, lr=1e-3, plot=False, warn_after=100,
        rewards={"accuracy": 1.0, "format": 0.1, "test_parity": 1.0},
    )  # fmt: skip
    base.update(kw)
    return GRPOOptions(**base)


def _records(out, name="metrics.jsonl"):
    with open(os.path.join(out, name)) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------ end to end
def test_three_steps_end_to_end(model_dir, tmp_path):
    opts = _opts(model_dir, tmp_path / "run", beta=0.05, plot=True)
    last = run_grpo(opts, progress=False)
    rec = _records(opts.out)
    assert [r["step"] for r in rec] == [0, 1, 2, 3]  # step 0: the evaluation before training
    assert "eval_accuracy" in rec[0] and "eval_accuracy" in rec[2] and "eval_accuracy" in rec[3]
    for key in (
        "reward", "reward_std", "frac_reward_zero_std", "rewards/accuracy/mean",
        "rewards/format/mean", "rewards/test_parity/mean", "completions/mean_length",
        "completions/max_length", "completions/clipped_ratio", "clip_ratio", "kl", "entropy",
        "loss", "grad_norm", "lr", "rollout_logprob_diff",
    ):  # fmt: skip
        assert key in last, key
    assert last["kl"] >= 0
    assert rec[1]["completions/max_length"] <= 12
    # fp32 training forward vs the engine's cached decode: the same distribution to rounding,
    # also after updates (the engine must see the new weights: a stale copy would drift)
    assert all(r["rollout_logprob_diff"] < 1e-3 for r in rec[1:]), rec
    samples = _records(opts.out, "completions.jsonl")
    assert len(samples) == 3 * opts.log_completions
    assert {"question", "completion", "reward", "advantage", "truncated"} <= set(samples[0])
    for f in ("reward.png", "eval_accuracy.png", "model/config.json", "model/tokenizer.json"):
        assert os.path.exists(os.path.join(opts.out, f)), f
    assert [s for s, _ in checkpoint_dirs(opts.out)] == [2, 3]
    # the routing bias never moves (it is a buffer, and GRPO makes no bias updates)
    before, after = load(model_dir), load(os.path.join(opts.out, "model"))
    for m0, m1 in zip(before.moe_layers(), after.moe_layers()):
        assert torch.equal(m0.gate.e_score_correction_bias, m1.gate.e_score_correction_bias)
    assert not all(torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))


def test_beta_zero_makes_no_reference_copy(model_dir, tmp_path):
    with mock.patch.object(grpo, "frozen_copy", wraps=grpo.frozen_copy) as spy:
        run_grpo(_opts(model_dir, tmp_path / "a", max_steps=1, eval_every=0), progress=False)
        assert spy.call_count == 0
        last = run_grpo(
            _opts(model_dir, tmp_path / "b", max_steps=1, eval_every=0, beta=0.1), progress=False
        )
        assert spy.call_count == 1 and "kl" in last


def test_resume_is_exact(model_dir, tmp_path):
    kw = dict(max_steps=4, save_every=2, num_iterations=2, lr_schedule="cosine", warmup_steps=1)
    full = _opts(model_dir, tmp_path / "full", **kw)
    run_grpo(full, progress=False)
    part = _opts(model_dir, tmp_path / "part", **kw)
    real_step = grpo.grpo_step
    calls = {"n": 0}

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    with mock.patch.object(grpo, "grpo_step", crash_on_third), pytest.raises(KeyboardInterrupt):
        run_grpo(part, progress=False)
    assert [s for s, _ in checkpoint_dirs(part.out)] == [2]
    # a later kill of a resumed attempt: rows past the checkpoint, the last one torn mid-write
    for name in ("metrics.jsonl", "completions.jsonl"):
        with open(os.path.join(part.out, name), "a") as f:
            f.write('{"step": 3, "reward": 9.0}\n{"step": 4, "rew')
    with pytest.warns(UserWarning, match="completions.jsonl: dropped a torn last line"):
        run_grpo(part, resume=True, progress=False)
    a, b = _records(full.out), _records(part.out)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("reward", "loss", "eval_accuracy", "completions/mean_length"):
            assert ra.get(k) == rb.get(k), (ra["step"], k)
    wa, wb = load(os.path.join(full.out, "model")), load(os.path.join(part.out, "model"))
    for (name, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(x, y), name
    assert _records(full.out, "completions.jsonl") == _records(part.out, "completions.jsonl")


# ------------------------------------------------------------------------------ pieces
def _rollout_batch(model_dir, adv=(1.0, -1.0, 0.5)):
    tok = Tokenizer.load(model_dir)
    rows = [
        dict(prompt=tok.encode("User: What is 1 + 2?\nAssistant: <think>", add_bos=True),
             completion=tok.encode(c, add_eos=True), advantage=a, logprobs=None)
        for c, a in zip(("1 + 2 = 3", "</think> <answer>3</answer>", "so 4"), adv)
    ]  # fmt: skip
    n_tok = sum(len(r["completion"]) for r in rows)
    return make_batches(rows, tok.pad_id, 8, {"n_tokens": float(n_tok), "n_seqs": 3.0})


def test_batches_label_completion_tokens_only(model_dir):
    (b,) = _rollout_batch(model_dir)
    tok = Tokenizer.load(model_dir)
    for row in range(3):
        labelled = [int(t) for t in b["labels"][row] if t != -100]
        assert tok.decode(labelled).endswith("<｜end▁of▁sentence｜>")
        assert "User" not in tok.decode(labelled)
    assert int((b["labels"][:, 1:] != -100).sum()) == int(b["n_tokens"])


def test_several_iterations_use_the_old_logprobs(model_dir):
    model = load(model_dir).eval()  # eval: no balance loss, so losses are the GRPO term alone
    loss_fn = make_loss_fn(GRPOOptions(model=model_dir, num_iterations=2))
    (b,) = _rollout_batch(model_dir)
    grpo.fill_logprobs(model, [b], "old_logp", 1.0, contextlib.nullcontext)
    old = b["old_logp"].clone()
    on_policy = {**b, "old_logp": None}  # what one iteration does: pi_old = pi, detached
    # before any update pi_old == pi: the ratio is 1 and both losses are -mean token advantage
    l_kept, _ = loss_fn(model, b, 0)
    l_none, _ = loss_fn(model, on_policy, 0)
    assert l_kept.item() == pytest.approx(l_none.item(), abs=1e-6)
    assert l_none.item() == pytest.approx(-_mean_token_adv(b), abs=1e-6)
    l_kept.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    # after it the kept log-probs still describe the policy that sampled: ratio != 1
    assert torch.equal(b["old_logp"], old)
    l_kept, _ = loss_fn(model, b, 1)
    l_none, _ = loss_fn(model, on_policy, 1)
    assert l_none.item() == pytest.approx(-_mean_token_adv(b), abs=1e-6)
    assert abs(l_kept.item() - l_none.item()) > 1e-4


def _mean_token_adv(b) -> float:
    mask = (b["labels"][:, 1:] != -100).float()
    return float((b["advantages"][:, None] * mask).sum() / mask.sum())


# ------------------------------------------------------------------------------ warnings
def test_no_signal_groups_are_dropped_and_failures_warned(model_dir, tmp_path):
    # the format reward alone: a random model never writes the format, so every group is all 0
    opts = _opts(model_dir, tmp_path / "r", rewards={"format": 1.0}, warn_after=2,
                 max_completion_length=4, eval_every=0)  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        last = run_grpo(opts, progress=False)
    text = " ".join(str(w.message) for w in caught)
    assert "format reward has been 0 for 2 steps" in text and "template" in text
    assert "no group had different rewards" in text
    assert "max_completion_length=4" in text  # every completion truncated
    assert last["frac_reward_zero_std"] == 1.0 and last["completions_trained"] == 0
    assert last["skipped_update"] == 1.0 and "loss" not in last


def test_bad_options(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="num_generations"):
        _opts(model_dir, tmp_path, num_generations=1).validate()
    with pytest.raises(ConfigError, match="temperature"):
        _opts(model_dir, tmp_path, temperature=0.0).validate()
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        _opts(model_dir, tmp_path, rewards={"nope": 1.0}).validate()
    with pytest.raises(ConfigError, match="template"):
        _opts(model_dir, tmp_path, template="x").validate()
    with pytest.raises(ValueError, match="valid tasks: .*countdown"):
        _opts(model_dir, tmp_path, task=["no_such_task"]).validate()
    # the r1zero instruction alone is longer than this model's 128-token context
    opts = _opts(model_dir, tmp_path / "long", template="r1zero", eval_every=0)
    with pytest.raises(ConfigError, match="exceeds the model's context of 128"):
        run_grpo(opts, progress=False)


def test_cli_grpo_with_a_jsonl_task(model_dir, tmp_path, capsys):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": a + b}) + "\n"
                            for a in range(8) for b in range(8)))  # fmt: skip
    out = tmp_path / "cli"
    args = ["grpo", "--model", model_dir, "--task", str(data), "--out", str(out),
            "--max_steps=1", "--prompts_per_step=2", "--num_generations=2",
            "--max_completion_length=6", "--eval_n=2", "--plot=false"]  # fmt: skip
    assert main(args) == 0
    assert "done: step 1" in capsys.readouterr().out
    sample = _records(out, "completions.jsonl")[0]
    assert sample["question"].startswith("What is") and "eval_accuracy" in _records(out)[-1]
    assert main(["grpo", "--model", model_dir, "--task", "nope", "--out", str(out)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_truncated_completions_can_be_masked(model_dir, tmp_path):
    opts = _opts(model_dir, tmp_path / "t", max_steps=1, eval_every=0, max_completion_length=3,
                 mask_truncated=True)  # fmt: skip
    last = run_grpo(opts, progress=False)
    assert last["completions/clipped_ratio"] == 1.0  # reported ...
    assert last["completions_trained"] == 0 and last["skipped_update"] == 1.0  # ... and masked


# ------------------------------------------------------------------------------ max_time_s
class _FakeClock:
    """grpo's `time` module whose perf_counter moves only when a GRPO step runs."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def _one_second_steps(monkeypatch, crash_on=None) -> list[int]:
    """Every GRPO step takes exactly 1.0 s on grpo's clock; returns the steps run (0-based)."""
    clock, real_step, calls = _FakeClock(), grpo.grpo_step, []

    def step(*a, **k):
        calls.append(a[1])
        if len(calls) == crash_on:
            raise KeyboardInterrupt
        out = real_step(*a, **k)
        clock.now += 1.0
        return out

    monkeypatch.setattr(grpo, "time", clock)
    monkeypatch.setattr(grpo, "grpo_step", step)
    return calls


def test_max_time_s_stops_saves_and_exports(model_dir, tmp_path, monkeypatch):
    opts = _opts(model_dir, tmp_path / "t", max_steps=10, max_time_s=2.5, save_every=100)
    calls = _one_second_steps(monkeypatch)
    last = run_grpo(opts, progress=False)
    assert calls == [0, 1, 2]  # 2 s < 2.5 s after two steps: a third; 3 s after it: stop
    rec = _records(opts.out)
    assert [r["step"] for r in rec] == [0, 1, 2, 3]
    assert [r["train_s"] for r in rec[1:]] == [1.0, 2.0, 3.0]
    assert last["step"] == 3 and last["train_s"] == 3.0
    assert "eval_accuracy" in rec[3]  # the stopping step is evaluated like a last step
    assert [s for s, _ in checkpoint_dirs(opts.out)] == [3]  # saved where it stopped
    assert os.path.isfile(os.path.join(opts.out, "model", "config.json"))
    assert os.path.isfile(os.path.join(opts.out, "model", "tokenizer.json"))
    # a resume of a run finished by time runs no more steps
    calls.clear()
    run_grpo(opts, resume=True, progress=False)
    assert calls == []
    assert _records(opts.out) == rec
    assert [s for s, _ in checkpoint_dirs(opts.out)] == [3]
    assert os.path.isfile(os.path.join(opts.out, "model", "config.json"))


def test_max_time_s_resume_continues_with_the_time_left(model_dir, tmp_path, monkeypatch):
    opts = _opts(model_dir, tmp_path / "r", max_steps=10, max_time_s=2.5, save_every=2,
                 eval_every=0)  # fmt: skip
    calls = _one_second_steps(monkeypatch, crash_on=3)
    with pytest.raises(KeyboardInterrupt):
        run_grpo(opts, progress=False)
    assert calls == [0, 1, 2]  # killed in the 3rd step, after the checkpoint of step 2
    assert [s for s, _ in checkpoint_dirs(opts.out)] == [2]
    calls = _one_second_steps(monkeypatch)
    run_grpo(opts, resume=True, progress=False)
    assert calls == [2]  # 2 s logged at the checkpoint: one more step, not three
    rec = _records(opts.out)
    assert [r["step"] for r in rec] == [1, 2, 3]
    assert [r["train_s"] for r in rec] == [1.0, 2.0, 3.0]
    assert [s for s, _ in checkpoint_dirs(opts.out)] == [2, 3]


def test_max_time_s_must_not_be_negative(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="max_time_s"):
        _opts(model_dir, tmp_path, max_time_s=-1.0).validate()
    _opts(model_dir, tmp_path, max_time_s=0.0).validate()  # 0: no limit


def test_grpo_reports_to_tensorboard(model_dir, tmp_path):
    """GRPO logs outside Trainer.fit; its steps reach the tracker with TRL's names."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opts = _opts(model_dir, tmp_path / "tb", max_steps=2, report_to="tensorboard")
    run_grpo(opts, progress=False)
    events = EventAccumulator(os.path.join(opts.out, "tensorboard"))
    events.Reload()
    rewards = events.Scalars("train/reward")
    assert [e.step for e in rewards] == [1, 2]
    assert [e.value for e in rewards] == pytest.approx([r["reward"] for r in _records(opts.out)
                                                        if "reward" in r])  # fmt: skip
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 2]


def test_rollout_samples_trust_the_engines_finish_reason(model_dir):
    """A rollout is cut at its first stop id (kept: it is trained on) and is truncated only when
    the engine ran out of tokens, not when it stopped at a config eos the tokenizer lacks."""
    from types import SimpleNamespace

    from nanoseek.tasks import get_task
    from nanoseek.train.grpo_rollouts import Rollouts

    tok = Tokenizer.load(model_dir)
    ids = tok.encode("<think>1</think> <answer>2</answer>")
    end = next(t for t in range(3, 100) if t not in ids and t != tok.eos_id)  # an end of turn
    rollouts = Rollouts(load(model_dir), (tok.eos_id, end), rows=2)
    problem = get_task("addition").generate(1, "test", seed=0, level=1)[0]

    def completion(tokens, reason):
        return SimpleNamespace(token_ids=tokens, finish_reason=reason)

    s = rollouts.sample(tok, problem, completion([*ids, tok.eos_id, 7], "stop"))
    assert s.token_ids == [*ids, tok.eos_id] and s.finished
    assert s.text == "<think>1</think> <answer>2</answer>"  # the end-of-turn token is no text
    assert rollouts.sample(tok, problem, completion([*ids, end], "stop")).token_ids == [*ids, end]
    assert rollouts.sample(tok, problem, completion(ids, "stop")).finished  # the engine's eos
    assert not rollouts.sample(tok, problem, completion(ids, "length")).finished


def test_eval_task_file_is_evaluated_whole_and_the_task_file_trained_whole(
    model_dir, tmp_path, monkeypatch
):
    from nanoseek.train import grpo

    def write(path, rows):
        with open(path, "w") as f:
            for q, a in rows:
                f.write(json.dumps({"question": q, "answer": a}) + "\n")
        return str(path)

    train = write(tmp_path / "train.jsonl", [(f"What is {i} + 1?", i + 1) for i in range(8)])
    test = write(tmp_path / "test.jsonl", [(f"What is {i} + 2?", i + 2) for i in range(3)])
    seen = {}

    def fake_held_out(tasks, n, seed, level):
        seen["eval"] = [t.count("test", level) for t in tasks]
        return []

    real_sampler = grpo.PromptSampler

    def sampler(tasks, seed, level):
        seen["train"] = [t.count("train", level) for t in tasks]
        return real_sampler(tasks, seed, level)

    monkeypatch.setattr(grpo, "heldout_across", fake_held_out)
    monkeypatch.setattr(grpo, "PromptSampler", sampler)
    opts = _opts(model_dir, tmp_path / "files", task=[train], eval_task=test, task_level=None,
                 max_steps=1, rewards={"accuracy": 1.0})  # fmt: skip
    run_grpo(opts, progress=False)
    assert seen == {"train": [8], "eval": [3]}
    # without eval_task the file keeps the hash split: what is evaluated is never trained on
    opts = _opts(model_dir, tmp_path / "one", task=[train], task_level=None, max_steps=1,
                 rewards={"accuracy": 1.0})  # fmt: skip
    run_grpo(opts, progress=False)
    assert seen["train"][0] + seen["eval"][0] == 8
    from nanoseek.tasks import TaskError

    with pytest.raises(TaskError, match="nope.jsonl: no such task file"):
        _opts(model_dir, tmp_path / "bad", eval_task=str(tmp_path / "nope.jsonl")).validate()


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_policy_logprobs_use_the_sampling_temperature(model_dir, tmp_path, temperature):
    """Before the first update the policy is the sampler: its recomputed log-probs (at the
    rollouts' temperature) equal the engine's. Without the temperature they would not."""
    opts = _opts(model_dir, tmp_path / f"t{temperature}", max_steps=1, eval_every=0,
                 temperature=temperature)  # fmt: skip
    run_grpo(opts, progress=False)
    (step,) = [r for r in _records(opts.out) if r.get("step") == 1]
    assert step["rollout_logprob_diff"] < 1e-3, step["rollout_logprob_diff"]
