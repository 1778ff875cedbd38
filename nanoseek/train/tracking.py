"""Experiment tracking: send each step's metrics to TensorBoard and/or Weights & Biases.

`report_to` takes the values of TRL's (and transformers' `TrainingArguments`) option of the same
name: "none" (the default), "tensorboard", "wandb", a comma-separated list of them, or "all".
metrics.jsonl and the PNG plots are written whatever it says; a tracker is an extra copy.

Metric names follow the Hugging Face Trainer's callbacks, so nanoseek runs sit beside TRL runs in
one dashboard: a metric is logged as `train/<name>`, an evaluation metric (`eval_<name>`) as
`eval/<name>` (`rewrite_logs` in transformers' integration_utils), and nanoseek's own short names
are renamed to the Trainer's: `lr` -> `train/learning_rate`, `val_loss` -> `eval/loss`. GRPO's
metrics already carry TRL's names (`reward`, `reward_std`, `completions/mean_length`, ...), so
they arrive as `train/reward`, `train/completions/mean_length`. Only finite or non-finite numbers
are logged; lists and text (warnings) stay in metrics.jsonl.

The tracker packages are optional (`pip install nanoseek[tracking]`), imported only when asked
for, and a missing one is a one-line error naming the package to install.

    tracker = open_trackers("tensorboard", out_dir, run_name, config)
    tracker.log({"loss": 2.3, "lr": 1e-3}, step=10)   # train/loss, train/learning_rate
    tracker.close()
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from nanoseek.config import ConfigError

BACKENDS = ("tensorboard", "wandb")
# nanoseek's short names -> the Hugging Face Trainer's (before the train/ or eval/ prefix)
RENAMES = {"lr": "learning_rate", "val_loss": "eval_loss"}
TENSORBOARD_DIR = "tensorboard"  # under the run's `out`: `tensorboard --logdir OUT/tensorboard`
_PIP_NAMES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TrackerMissing(ConfigError):
    """A tracker was asked for whose package is not installed."""


def parse_report_to(report_to: str | Sequence[str] | None) -> list[str]:
    """The backends a `report_to` value names: [] for "none", both for "all"; raises on others."""
    if report_to is None:
        return []
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [n.strip().lower() for n in names if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return list(BACKENDS)
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise ConfigError(
            f"option 'report_to': unknown tracker {bad[0]!r}; use none, tensorboard, wandb, "
            "a comma-separated list of them, or all"
        )
    return list(dict.fromkeys(names))  # each once, in the order given


def tracker_name(key: str) -> str:
    """The dashboard name of a metrics.jsonl key: `loss` -> `train/loss`, `eval_x` -> `eval/x`."""
    key = RENAMES.get(key, key)
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_") :]
    return "train/" + key


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics under their dashboard names (`step` is the x axis, not a metric)."""
    return {
        tracker_name(k): float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars to an event file under OUT/tensorboard, through torch's SummaryWriter."""

    def __init__(self, out_dir: str, run_name: str, config: Mapping[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard
        except ImportError:
            raise _missing("tensorboard") from None
        self.log_dir = os.path.join(out_dir, TENSORBOARD_DIR)
        self.writer = SummaryWriter(log_dir=self.log_dir)
        # the run's options, readable in TensorBoard's Text tab
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(config.items()))
        self.writer.add_text("config", f"| option | value |\n|---|---|\n{rows}", 0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run. Project, entity and mode come from the usual environment
    variables (WANDB_PROJECT, default "nanoseek"; WANDB_ENTITY; WANDB_MODE=offline|disabled)."""

    def __init__(self, out_dir: str, run_name: str, config: Mapping[str, Any]):
        try:
            import wandb  # optional: wandb
        except ImportError:
            raise _missing("wandb") from None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "nanoseek"),
            name=run_name,
            dir=out_dir,
            config=dict(config),
            reinit=True,
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


_BACKEND_CLASSES: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def _missing(name: str) -> TrackerMissing:
    pip = _PIP_NAMES[name]
    return TrackerMissing(
        f"option 'report_to': {name} is not installed; `pip install {pip}` "
        f"(or `pip install nanoseek[tracking]`), or use --report_to=none"
    )


class Trackers:
    """Every tracker a run reports to; with none it does nothing (the default)."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log a metrics.jsonl record (nanoseek's names) at `step`."""
        if not self.trackers:
            return
        values = scalars(metrics)
        if values:
            for t in self.trackers:
                t.log(values, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_trackers(
    report_to: str | Sequence[str] | None,
    out_dir: str,
    run_name: str | None = None,
    config: Mapping[str, Any] | None = None,
    *,
    enabled: bool = True,
) -> Trackers:
    """Open the trackers `report_to` names (none when `enabled` is false: ranks other than 0).

    Checks the value and the packages on every rank, so a typo or a missing package stops the
    run before any work, on all ranks alike.
    """
    names = parse_report_to(report_to)
    run_name = run_name or os.path.basename(os.path.abspath(out_dir))
    if not enabled:
        for name in names:  # fail alike on every rank
            _check_installed(name)
        return Trackers()
    flat = {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in (config or {}).items()
    }
    opened: list[Tracker] = []
    try:
        for name in names:
            opened.append(_BACKEND_CLASSES[name](out_dir, run_name, flat))
    except BaseException:
        for t in opened:
            t.close()
        raise
    return Trackers(opened)


def _check_installed(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise _missing(name)
