"""Experiment tracking (`--report_to`): names as TRL/transformers log them, optional packages,
TensorBoard events read back, and metrics.jsonl kept."""

import json
import os
import subprocess
import sys

import pytest

from nanoseek.config import ConfigError
from nanoseek.train.tracking import (
    TrackerMissing,
    Trackers,
    open_trackers,
    parse_report_to,
    scalars,
    tracker_name,
)
from tests.train.test_pretrain import _opts


@pytest.mark.parametrize(
    "value, backends",
    [
        ("none", []),
        (None, []),
        ("", []),
        ("tensorboard", ["tensorboard"]),
        ("wandb", ["wandb"]),
        ("TensorBoard, wandb", ["tensorboard", "wandb"]),
        ("tensorboard,tensorboard", ["tensorboard"]),
        ("all", ["tensorboard", "wandb"]),
        (["wandb"], ["wandb"]),
    ],
)
def test_parse_report_to(value, backends):
    assert parse_report_to(value) == backends


@pytest.mark.parametrize("value", ["tensorbord", "mlflow", "none,wandb", "all,wandb"])
def test_parse_report_to_rejects(value):
    with pytest.raises(ConfigError, match="report_to"):
        parse_report_to(value)


@pytest.mark.parametrize(
    "key, name",
    [
        ("loss", "train/loss"),
        ("lr", "train/learning_rate"),
        ("grad_norm", "train/grad_norm"),
        ("val_loss", "eval/loss"),
        ("reward", "train/reward"),  # GRPO: TRL's own names, prefixed as its Trainer does
        ("completions/mean_length", "train/completions/mean_length"),
        ("eval_accuracy", "eval/accuracy"),
    ],
)
def test_names_follow_the_hugging_face_trainer(key, name):
    assert tracker_name(key) == name


def test_only_numbers_are_logged():
    got = scalars({"step": 3, "loss": 2, "lr": 1e-3, "warnings": ["x"], "ok": True, "s": "t"})
    assert got == {"train/loss": 2.0, "train/learning_rate": 1e-3}


class FakeTracker:
    def __init__(self):
        self.logged, self.closed = [], False

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def close(self):
        self.closed = True


def test_trackers_fan_out_and_close():
    a, b = FakeTracker(), FakeTracker()
    with Trackers([a, b]) as t:
        t.log({"step": 1, "loss": 1.5}, 1)
        t.log({"step": 2, "warnings": ["only text"]}, 2)  # nothing numeric: nothing sent
    assert a.logged == b.logged == [(1, {"train/loss": 1.5})]
    assert a.closed and b.closed


def test_none_opens_nothing(tmp_path):
    t = open_trackers("none", str(tmp_path))
    assert t.trackers == []
    t.log({"loss": 1.0}, 1)  # a no-op
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "backend, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")]
)
def test_missing_package_is_one_line_naming_it(tmp_path, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(TrackerMissing) as err:
        open_trackers(backend, str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and f"pip install {backend}" in msg


def test_other_ranks_check_the_package_too(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # nothing installed
    with pytest.raises(TrackerMissing, match="pip install wandb"):
        open_trackers("wandb", str(tmp_path), enabled=False)


def test_importing_the_trainers_imports_no_tracker():
    code = (
        "import sys, nanoseek.train.loop, nanoseek.train.pretrain, nanoseek.train.sft, "
        "nanoseek.train.distill, nanoseek.train.tracking; "
        "print(sorted(m for m in ('tensorboard', 'wandb', 'torch.utils.tensorboard') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pretrain_reports_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nanoseek.train.pretrain import run_pretrain

    opts = _opts(tmp_path, "tb", report_to="tensorboard", max_steps=4, eval_every=2)
    run_pretrain(opts, progress=False)
    with open(os.path.join(opts.out, "metrics.jsonl")) as f:  # metrics.jsonl stays
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    events = EventAccumulator(os.path.join(opts.out, "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records])
    lr = [e.value for e in events.Scalars("train/learning_rate")]
    assert lr == pytest.approx([r["lr"] for r in records])
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]
    assert "config/text_summary" in events.Tags()["tensors"]  # the run's options


def test_typo_in_report_to_fails_before_training(tmp_path):
    from nanoseek.train.pretrain import run_pretrain

    with pytest.raises(ConfigError, match="report_to"):
        run_pretrain(_opts(tmp_path, "typo", report_to="tensorbord"), progress=False)
    assert not os.path.exists(os.path.join(tmp_path, "typo", "metrics.jsonl"))


@pytest.mark.slow  # wandb starts a service process: about a minute on a busy 2-core machine
def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with open_trackers("wandb", str(tmp_path), "t", {"lr": 1e-3}) as t:
        t.log({"loss": 1.25, "lr": 1e-3}, 1)
        run = t.trackers[0].run
        assert run.name == "t" and run.config["lr"] == 1e-3
    assert any(p.startswith("wandb") for p in os.listdir(tmp_path))
