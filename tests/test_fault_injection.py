"""Fault injection: what a kill -9, a full disk or a corrupt file can do to a run (docs/guarantees.md).

- kill -9 of `nanoseek pretrain` subprocesses, chained on one run directory: at seeded call
  counts of the functions that write a checkpoint (mid-save: staging written, not published;
  between the writes of a start-up file; ...) and at seeded times from outside; then
  `--resume` must finish with exactly one metrics row per step, the same losses as a run never
  killed, loadable checkpoints and no staging left behind;
- a full disk (injected ENOSPC) while saving: one line naming the path, earlier checkpoints
  intact, the run resumable;
- truncated files of a model directory: one-line errors naming the file.
Hostile HTTP requests are covered in tests/serve/test_guards.py. Runs in well under a minute.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import nanoseek
from nanoseek.checkpoint.trainer_state import checkpoint_dirs, load_state
from nanoseek.cli import main
from nanoseek.data.tokenizer import Tokenizer
from tests.helpers import tiny_config

STEPS = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runs nanoseek's CLI with one function replaced by a wrapper that SIGKILLs the process on its
# Nth call (before the call: whatever it was about to write is never written)
CHILD = r"""
import importlib, os, signal, sys
target, nth = sys.argv[1], int(sys.argv[2])
module, attr = target.rsplit(".", 1)
mod = importlib.import_module(module)
real, calls = getattr(mod, attr), [0]
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(mod, attr, wrapper)
from nanoseek.cli import main
sys.exit(main(sys.argv[3:]))
"""


def pretrain_args(out, model_json) -> list[str]:
    return [
        "pretrain", "--out", str(out), f"--model={model_json}", "--corpus_docs=200",
        "--vocab_size=512", "--seq_len=32", "--batch_size=2", f"--max_steps={STEPS}",
        "--warmup_steps=2", "--eval_every=0", "--save_every=1", "--keep_last=2",
        "--precision=fp32", "--plot=false",
    ]  # fmt: skip


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def run_cli(args, kill_at=None, kill_after_s=None) -> int:
    """Exit code of `nanoseek ARGS` in a subprocess (-9: killed)."""
    cmd = [sys.executable, "-c", CHILD, *kill_at, *args] if kill_at else [
        sys.executable, "-m", "nanoseek", *args
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after_s is not None:
        try:
            proc.wait(kill_after_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(err.decode())
    return proc.returncode


def last_error(capsys) -> str:
    """The `nanoseek: error:` line of stderr (it follows the unfinished progress bar)."""
    err = capsys.readouterr().err
    return err[err.rindex("nanoseek: error: ") :].split("\n")[0]


def rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def staging(out) -> list[str]:
    found = []
    for parent in (out, os.path.join(out, "checkpoints")):
        for name in os.listdir(parent) if os.path.isdir(parent) else []:
            if ".tmp-" in name or ".old-" in name or name.startswith((".state-", ".step-")):
                found.append(os.path.join(parent, name))
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model config path, reference run directory: the same run, never killed, and its time)"""
    root = tmp_path_factory.mktemp("faults")
    tiny_config(vocab_size=512, num_hidden_layers=2, max_position_embeddings=128).save_pretrained(
        root
    )
    model_json = root / "model.json"
    os.replace(root / "config.json", model_json)
    t0 = time.monotonic()
    assert run_cli(pretrain_args(root / "reference", model_json)) == 0
    return model_json, root / "reference", time.monotonic() - t0


def assert_finished_like_reference(out, reference):
    got, want = rows(out), rows(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one row per step
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # resume is exact
    assert [s for s, _ in checkpoint_dirs(str(out))] == [STEPS - 1, STEPS]
    for _, path in checkpoint_dirs(str(out)):
        assert load_state(path)["step"] in (STEPS - 1, STEPS)
        nanoseek.load(path)
    nanoseek.load(out / "model")
    assert staging(str(out)) == []


# (function, calls before the kill at most): each kill lands within the first few saves
KILL_POINTS = [
    ("nanoseek.checkpoint.io.save_file", 3),  # model weights of a checkpoint: mid-save
    ("nanoseek.checkpoint.trainer_state.save_file", 3),  # the trainer state, before the weights
    ("os.rename", 3),  # publishing a checkpoint or the tokenizer folder
    ("os.replace", 6),  # options.json, shards, shard renames inside a checkpoint, logs
    ("os.fsync", 10),  # between a write and the rename that publishes it
]


def test_kill_at_seeded_points_then_resume(setup, tmp_path):
    model_json, reference, _ = setup
    out = tmp_path / "run"
    rng = random.Random(17)
    args = pretrain_args(out, model_json)
    for i, (target, most) in enumerate(KILL_POINTS):
        nth = rng.randint(1, most)
        resume = ["--resume"] if i else []
        assert run_cli([*args, *resume], kill_at=[target, str(nth)]) == -signal.SIGKILL, target
    assert run_cli([*args, "--resume"]) == 0
    assert_finished_like_reference(out, reference)


def test_kill_at_seeded_times_then_resume(setup, tmp_path):
    model_json, reference, seconds = setup
    out = tmp_path / "run"
    rng = random.Random(5)
    args = pretrain_args(out, model_json)
    for i in range(3):  # anywhere from start-up to the last save
        run_cli([*args, *(["--resume"] if i else [])], kill_after_s=rng.uniform(0.3, 1.0) * seconds)
    assert run_cli([*args, "--resume"]) == 0
    assert_finished_like_reference(out, reference)


def test_full_disk_while_saving_then_resume(setup, tmp_path, monkeypatch, capsys):
    from nanoseek.checkpoint import io

    model_json, reference, _ = setup
    out = tmp_path / "run"
    real, calls = io.save_file, [0]

    def disk_fills_at_third_save(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(io, "save_file", disk_fills_at_third_save)
    # this run is in-process; the reference ran with one thread, and a parallel reduction on two
    # threads rounds differently (OMP_NUM_THREADS is read once, when torch is imported)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(pretrain_args(out, model_json)) == 2
    finally:
        torch.set_num_threads(threads)
    err = last_error(capsys)
    path = out / "checkpoints" / "step-000003"
    assert err == (
        f"nanoseek: error: {path}: cannot save the checkpoint (No space left on device); "
        "nothing saved there before was changed"
    )
    assert [s for s, _ in checkpoint_dirs(str(out))] == [1, 2] and staging(str(out)) == []
    monkeypatch.undo()
    assert run_cli([*pretrain_args(out, model_json), "--resume"]) == 0
    assert_finished_like_reference(out, reference)


def test_full_disk_at_start_up_names_the_path(setup, tmp_path, monkeypatch, capsys):
    model_json, _, _ = setup

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the first write to publish is the tokenizer's
    assert main(pretrain_args(tmp_path / "run", model_json)) == 2
    err = last_error(capsys)
    tok = tmp_path / "run" / "tokenizer"
    assert err == f"nanoseek: error: {tok}: cannot write (No space left on device)"
    assert not tok.exists() and staging(str(tmp_path / "run")) == []


def test_truncated_model_files_are_one_line_errors(setup, tmp_path, capsys):
    _, reference, _ = setup
    rng = random.Random(3)
    for name in sorted(os.listdir(reference / "model")):
        d = tmp_path / name
        d.mkdir()
        for other in os.listdir(reference / "model"):
            data = (reference / "model" / other).read_bytes()
            if other == name:  # cut at a seeded point, never whole
                data = data[: rng.randrange(len(data.rstrip()))]
            (d / other).write_bytes(data)
        if name.startswith("tokenizer"):
            with pytest.raises(ValueError) as info:  # ConfigError
                Tokenizer.load(d)
            msg = str(info.value)
        else:
            assert main(["info", str(d), "--scan"]) == 2
            msg = capsys.readouterr().err.strip()
            assert msg.startswith("nanoseek: error: ")
        assert str(d / name) in msg and "\n" not in msg, msg
