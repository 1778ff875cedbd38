"""GRPO under torchrun (2 gloo ranks) equals one process, and its sharded checkpoint resumes in one.

Every completion has its own seed, so the 2 ranks' replicas (each generating half of the
completions) produce the one process's rollouts; rewards and advantages are then identical, and
the policy update over the ranks' micro-batches (FSDP2, dp=2) must give the same losses,
gradient norms, held-out accuracy and weights to float32 tolerance. The run's step-2 checkpoint
(sharded, written by both ranks) is resumed by one process for a third step, which must match the
one-process run's third step.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from nanoseek import CausalLM, load, save
from nanoseek.tasks.rewards import register_reward
from nanoseek.train.grpo import GRPOOptions, run_grpo
from tests.dist.launch import spawn
from tests.helpers import tiny_config
from tests.train.test_sft import tok_dir  # noqa: F401 - fixture

# A reward with variance even for a random model (registered in the workers too: they import
# this module to find `_worker`)
register_reward("test_parity", lambda p, c: float(len(c) % 2), overwrite=True)
LR = 1e-3
KEYS = ("reward", "reward_std", "loss", "grad_norm", "kl", "clip_ratio", "entropy")


def _opts(model_dir: str, out: str, **kw) -> GRPOOptions:
    base = dict(
        model=model_dir, out=out, task=["addition"], task_level=1, max_steps=3,
        prompts_per_step=2, num_generations=4, max_completion_length=12, batch_size=4,
        eval_every=2, eval_n=4, save_every=1, lr=LR, plot=False, warn_after=100, beta=0.05,
        rewards={"accuracy": 1.0, "format": 0.1, "test_parity": 1.0},
    )  # fmt: skip
    return GRPOOptions(**{**base, **kw})


def _worker(rank: int, world_size: int, model_dir: str, out: str) -> None:
    from nanoseek.dist.parallel import shutdown

    dist.init_process_group("gloo")
    try:
        run_grpo(_opts(model_dir, out, max_steps=2), progress=False)
    except BaseException:
        shutdown(synchronize=False)
        raise
    shutdown(synchronize=True)


def _records(out) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def test_grpo_on_two_ranks_matches_one_process_and_resumes_in_one(tmp_path, tok_dir):  # noqa: F811
    torch.manual_seed(0)
    model = CausalLM(tiny_config(vocab_size=512, num_hidden_layers=2, max_position_embeddings=128))
    model.init_weights(std=0.05)  # peaked enough that completions sometimes stop at eos
    files = [os.path.join(tok_dir, f) for f in ("tokenizer.json", "tokenizer_config.json")]
    model_dir = str(tmp_path / "model")
    save(model, model_dir, extra_files=files)

    ref = str(tmp_path / "ref")
    run_grpo(_opts(model_dir, ref), progress=False)
    two = str(tmp_path / "two")
    spawn(_worker, 2, model_dir, two, timeout=240)
    want, got = _records(ref), _records(two)
    assert [r["step"] for r in got] == [0, 1, 2]
    assert got[0]["eval_accuracy"] == want[0]["eval_accuracy"]
    for g, w in zip(got[1:], want[1:3]):
        assert g["completions/mean_length"] == w["completions/mean_length"]  # same rollouts
        for k in KEYS:
            assert abs(g[k] - w[k]) <= 1e-5 * max(1.0, abs(w[k])), (g["step"], k, g[k], w[k])
    assert os.path.isdir(os.path.join(two, "checkpoints", "step-000002", "dcp"))

    # one process continues the 2-rank run from its sharded step-2 checkpoint
    run_grpo(_opts(model_dir, two), resume=True, progress=False)
    got = _records(two)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    for k in (*KEYS, "completions/mean_length", "eval_accuracy"):
        assert abs(got[3][k] - want[3][k]) <= 1e-5 * max(1.0, abs(want[3][k])), (k, got[3], want[3])
    a, b = load(f"{two}/model").state_dict(), load(f"{ref}/model").state_dict()
    for key in a:  # tolerance: see tests/dist/test_parallel_training.py
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0.2 * LR, msg=key)
