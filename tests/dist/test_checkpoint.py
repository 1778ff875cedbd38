"""`torchrun -m nanoseek pretrain` on 2 gloo ranks, and checkpoints across world sizes.

One reference run on one process (6 steps, checkpoints at 3 and 6). Then, on the same data:
- 2 ranks under torchrun (experts split, the rest FSDP-sharded): the same losses step for step,
  sharded checkpoints, and a consolidated OUT/model equal to the reference's;
- the 2-rank run's step-3 checkpoint resumed by ONE process (2 -> 1);
- the one-process step-3 checkpoint resumed by 2 ranks with plain FSDP (1 -> 2);
both continue to the reference's losses and final weights.
The model has no MTP module and no sequence-wise loss: its loss is the main loss alone, for
which W ranks x B/W rows are exactly one process x B rows (see docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanoseek import load
from nanoseek.checkpoint.trainer_state import checkpoint_dirs
from nanoseek.dist.checkpoint import consolidate
from nanoseek.train.pretrain import PretrainOptions, run_pretrain
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTIONS = dict(
    corpus_docs=400, vocab_size=512, seq_len=64, batch_size=4, max_steps=6, warmup_steps=2,
    eval_every=3, eval_batches=2, save_every=3, precision="fp32", plot=False,
    seq_aux_alpha=0.0,
)  # fmt: skip


def _losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _val_losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["val_loss"] for r in map(json.loads, f) if "val_loss" in r]


def _torchrun(out: str, model: str, *args: str) -> None:
    """2 ranks through the real entry point; fails (never hangs) within the timeout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    overrides = [f"--{k}={v}" for k, v in OPTIONS.items()]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "nanoseek", "pretrain", "--out", out, f"--model={model}", "--dist_timeout_s=60",
        *overrides, *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    errors = [ln for ln in proc.stderr.splitlines() if "nanoseek: error" in ln]  # each rank's
    assert proc.returncode == 0, "\n".join(errors) + "\n" + proc.stderr[-3000:]


def _copy_run(src: str, dst: str, keep_step: int | None = None) -> None:
    """A copy of a run directory; with `keep_step`, as if it had died right after that
    checkpoint (later checkpoints and the final model removed)."""
    shutil.copytree(src, dst)
    if keep_step is not None:
        for step, path in checkpoint_dirs(dst):
            if step > keep_step:
                shutil.rmtree(path)
        shutil.rmtree(os.path.join(dst, "model"), ignore_errors=True)


def _assert_same_model(a: str, b: str) -> None:
    sa, sb = load(a).state_dict(), load(b).state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:  # Adam amplifies fp32 summation-order noise to a few % of lr (see
        # tests/dist/test_parallel_training.py); a wrong update is ~lr per step
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0.2 * 3e-3, msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_ckpt")
    cfg = tiny_config(
        vocab_size=512, num_hidden_layers=2, max_position_embeddings=128,
        num_nextn_predict_layers=0,
    )  # fmt: skip
    cfg.save_pretrained(tmp)
    model = str(tmp / "model.json")
    os.replace(tmp / "config.json", model)
    ref = str(tmp / "ref")
    run_pretrain(PretrainOptions(out=ref, model=model, **OPTIONS), progress=False)
    return tmp, model, ref


def test_torchrun_two_ranks_matches_one_process_and_resumes_on_one(reference):
    tmp, model, ref = reference
    two = str(tmp / "two")
    os.makedirs(two)
    for sub in ("tokenizer", "data"):  # the same tokenizer and shards, and no time to rebuild
        shutil.copytree(os.path.join(ref, sub), os.path.join(two, sub))
    _torchrun(two, model, "--ep=2")
    torch.testing.assert_close(_losses(two), _losses(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_val_losses(two), _val_losses(ref), rtol=1e-5, atol=1e-6)
    steps = checkpoint_dirs(two)
    assert [s for s, _ in steps] == [3, 6]
    assert os.path.exists(os.path.join(steps[0][1], "dcp", ".metadata"))
    _assert_same_model(os.path.join(two, "model"), os.path.join(ref, "model"))
    # the offline consolidation of the last sharded checkpoint is that same model
    consolidate(steps[-1][1], str(tmp / "two_step6_hf"))
    _assert_same_model(str(tmp / "two_step6_hf"), os.path.join(two, "model"))

    # 2 -> 1: the sharded step-3 checkpoint, continued by one process
    two_to_one = str(tmp / "two_to_one")
    _copy_run(two, two_to_one, keep_step=3)
    opts = PretrainOptions(out=two_to_one, model=model, **OPTIONS)
    run_pretrain(opts, resume=True, progress=False)
    torch.testing.assert_close(_losses(two_to_one), _losses(ref), rtol=1e-5, atol=1e-6)
    _assert_same_model(os.path.join(two_to_one, "model"), os.path.join(ref, "model"))


def test_one_process_checkpoint_resumes_on_two_ranks(reference):
    tmp, model, ref = reference
    one_to_two = str(tmp / "one_to_two")
    _copy_run(ref, one_to_two, keep_step=3)
    _torchrun(one_to_two, model, "--resume", "--fsdp=true")
    torch.testing.assert_close(_losses(one_to_two), _losses(ref), rtol=1e-5, atol=1e-6)
    _assert_same_model(os.path.join(one_to_two, "model"), os.path.join(ref, "model"))
    # the resumed run writes sharded checkpoints from then on
    assert os.path.exists(os.path.join(checkpoint_dirs(one_to_two)[-1][1], "dcp", ".metadata"))
