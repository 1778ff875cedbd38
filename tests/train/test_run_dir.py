"""One run per `--out`: a previous run is an error (or cleared with overwrite), logs hold one row
per step after any sequence of kills, staging folders of killed saves are removed, and resume
falls back past a broken checkpoint to the newest intact one, exactly."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from nanoseek.checkpoint.io import CheckpointError
from nanoseek.checkpoint.trainer_state import checkpoint_dirs
from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.train.pretrain import run_pretrain
from nanoseek.train.run_dir import claim_out_dir, clean_staging, truncate_jsonl
from tests.train.test_pretrain import _losses, _opts


def _steps(out, name="metrics.jsonl"):
    with open(os.path.join(out, name)) as f:
        return [json.loads(line)["step"] for line in f]


def _write(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------ the run directory
def test_a_previous_run_is_refused_or_cleared_with_overwrite(tmp_path):
    out = str(tmp_path / "run")
    _write(os.path.join(out, "checkpoints", "step-000004", "trainer_state.json"), "{}")
    _write(os.path.join(out, "metrics.jsonl"), '{"step": 1}\n')
    _write(os.path.join(out, "data", "shard.bin"), "kept")  # a cache, not the run
    with pytest.raises(ConfigError) as e:
        claim_out_dir(out, resume=False, overwrite=False)
    assert out in str(e.value) and "--overwrite" in str(e.value) and "\n" not in str(e.value)
    assert os.path.exists(os.path.join(out, "metrics.jsonl"))  # refused: nothing touched
    claim_out_dir(out, resume=True, overwrite=False)  # resuming it is what it is there for
    with pytest.raises(ConfigError, match="exclude each other"):
        claim_out_dir(out, resume=True, overwrite=True)
    claim_out_dir(out, resume=False, overwrite=True)
    assert sorted(os.listdir(out)) == ["data"]
    claim_out_dir(str(tmp_path / "new"), resume=False, overwrite=False)  # nothing there: fine


def test_staging_folders_of_killed_saves_are_removed(tmp_path):
    out = str(tmp_path / "run")
    ckpts = os.path.join(out, "checkpoints")
    dead = 2**22 + 12345  # above any pid_max default: no such process
    staging = [
        os.path.join(ckpts, f".state-{dead}"),
        os.path.join(ckpts, f"step-000006.tmp-{dead}-0123abcd"),
        os.path.join(ckpts, ".step-000006.partial"),
        os.path.join(ckpts, f"step-000003.old-{dead}-0123abcd"),  # step-000003 exists
        os.path.join(out, f"model.tmp-{dead}-89abcdef"),
    ]
    for path in staging:
        _write(os.path.join(path, "x"))
    _write(os.path.join(ckpts, "step-000003", "trainer_state.json"), "{}")
    # killed between the two renames of a re-save: the previous copy is put back
    _write(os.path.join(ckpts, f"step-000002.old-{dead}-0123abcd", "trainer_state.json"), "{}")
    _write(os.path.join(out, "metrics.jsonl.tmp"))
    live = os.path.join(ckpts, f".state-{os.getppid()}")  # a live process's: left alone
    _write(os.path.join(live, "x"))
    claim_out_dir(out, resume=True, overwrite=False)
    assert sorted(os.listdir(ckpts)) == [f".state-{os.getppid()}", "step-000002", "step-000003"]
    assert os.listdir(out) == ["checkpoints"]
    assert clean_staging(out) == []


def test_truncation_drops_a_torn_last_line_and_names_a_corrupt_one(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    _write(path, '{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    with pytest.warns(UserWarning, match=f"{path}: dropped a torn last line"):
        truncate_jsonl(path, 2)
    assert _steps(str(tmp_path)) == [1, 2]
    _write(path, '{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}: line 2 "):
        truncate_jsonl(path, 2)


# ------------------------------------------------------------------ real runs
class Stop(Exception):
    pass


def _run_until(opts, stop_after: int):
    """Run, killed right after the checkpoint of step `stop_after`."""
    import nanoseek.train.loop as loop

    original = loop.Trainer.save

    def save_then_stop(self):
        path = original(self)
        if self.step == stop_after:
            raise Stop
        return path

    loop.Trainer.save = save_then_stop
    try:
        with pytest.raises(Stop):
            run_pretrain(opts, progress=False)
    finally:
        loop.Trainer.save = original


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    opts = _opts(tmp_path_factory.mktemp("ref"), "full")
    run_pretrain(opts, progress=False)
    return opts


def test_repeated_kills_leave_one_metrics_row_per_step(tmp_path, reference):
    opts = _opts(tmp_path, "part")
    _run_until(opts, 3)
    # later kills: rows logged past the checkpoint, the last one torn mid-write
    with open(os.path.join(opts.out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "loss": 9.0}\n{"step": 5, "loss": 9.0}\n{"step": 6, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl: dropped a torn last line"):
        run_pretrain(opts, resume=True, progress=False)
    assert _steps(opts.out) == [1, 2, 3, 4, 5, 6]
    assert _losses(opts.out) == _losses(reference.out)


def test_a_kill_before_the_first_checkpoint_leaves_no_stale_rows(tmp_path, reference):
    opts = _opts(tmp_path, "early")
    _write(os.path.join(opts.out, "metrics.jsonl"), '{"step": 1, "loss": 9.0}\n')
    run_pretrain(opts, resume=True, progress=False)
    assert _losses(opts.out) == _losses(reference.out)


def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path, reference):
    out = str(tmp_path / "copy")
    shutil.copytree(reference.out, out)
    weights = os.path.join(out, "checkpoints", "step-000006", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = f.readlines()
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(rows[:5])  # killed before step 6 was logged... after it was saved
    opts = _opts(tmp_path, "copy")
    with pytest.warns(UserWarning, match="skipped checkpoint .*step-000006.*model.safetensors"):
        run_pretrain(opts, resume=True, progress=False)
    assert _losses(out) == _losses(reference.out)  # steps 4-6 redone from step 3, exactly
    assert [s for s, _ in checkpoint_dirs(out)] == [3, 6]
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-000006.corrupt"))


def test_every_checkpoint_broken_is_an_error_not_a_restart(tmp_path, reference):
    out = str(tmp_path / "copy")
    shutil.copytree(reference.out, out)
    for _, path in checkpoint_dirs(out):
        _write(os.path.join(path, "trainer_state.json"), '{"format": ')
    with pytest.raises(CheckpointError, match="no intact checkpoint.*trainer_state.json"):
        run_pretrain(_opts(tmp_path, "copy"), resume=True, progress=False)
    assert len(checkpoint_dirs(out)) == 2  # nothing set aside or deleted


def test_cli_refuses_an_out_with_a_previous_run_unless_overwrite(tmp_path, reference, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(reference.out, out)
    cfg = reference.model
    args = ["pretrain", "--out", out, f"--model={cfg}", "--corpus_docs=400", "--vocab_size=512",
            "--seq_len=64", "--batch_size=4", "--max_steps=2", "--warmup_steps=2",
            "--eval_every=0", "--save_every=100", "--precision=fp32", "--plot=false"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nanoseek: error: {out}: holds a previous run") and err.count("\n") == 1
    assert [s for s, _ in checkpoint_dirs(out)] == [3, 6]  # the old run is intact
    assert main([*args, "--overwrite"]) == 0
    assert _steps(out) == [1, 2]
    assert [s for s, _ in checkpoint_dirs(out)] == [2]
