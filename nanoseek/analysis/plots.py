"""PNG plots written with a run: loss curves and the expert-load heatmap.

matplotlib is imported inside the functions (with the non-interactive Agg backend) so that
importing nanoseek never needs a display or pays matplotlib's start-up time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not dragged to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out


def plot_losses(records: list[dict], path: str, title: str = "training loss") -> None:
    """Main loss (raw and smoothed), MTP losses and validation loss against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [r["step"] for r in records]
    main = [r.get("main_loss", r["loss"]) for r in records]
    ax.plot(steps, main, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(steps, smooth(main), color="tab:blue", label="main loss (EMA)")
    depth = 1
    while any(f"mtp_loss_{depth}" in r for r in records):
        pts = [(r["step"], r[f"mtp_loss_{depth}"]) for r in records if f"mtp_loss_{depth}" in r]
        ax.plot([p[0] for p in pts], smooth([p[1] for p in pts]), label=f"MTP depth {depth} (EMA)")
        depth += 1
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", color="tab:red", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_expert_load(
    loads: list[list[float]],
    path: str,
    layer_names: Sequence[str] | None = None,
    title: str = "tokens per expert (share of the mean)",
) -> None:
    """Heatmap, one row per MoE layer: each expert's load divided by the layer's mean load
    (1.0 = perfectly balanced)."""
    plt = _pyplot()
    import numpy as np

    arr = np.asarray(loads, dtype=float)
    rel = arr / np.maximum(arr.mean(axis=1, keepdims=True), 1e-9)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * arr.shape[1] + 2), 0.5 * arr.shape[0] + 1.6))
    im = ax.imshow(rel, cmap="coolwarm", vmin=0, vmax=2, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_yticks(range(arr.shape[0]))
    ax.set_yticklabels(layer_names or [f"MoE {i}" for i in range(arr.shape[0])])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / mean load")
    fig.tight_layout()
    _save(fig, path)


def plot_curves(
    series: dict[str, tuple[list[float], list[float]]],
    path: str,
    title: str,
    ylabel: str,
    smooth_alpha: float | None = 0.1,
) -> None:
    """Several named (x, y) curves in one figure (e.g. BF16 vs FP8, aux-free vs aux-loss)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (x, y) in series.items():
        ax.plot(x, smooth(y, smooth_alpha) if smooth_alpha else y, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
