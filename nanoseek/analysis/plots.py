"""PNG plots written with a run: loss curves and the expert-load heatmap.

matplotlib is imported inside the functions (with the non-interactive Agg backend) so that
importing nanoseek never needs a display or pays matplotlib's start-up time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot():
    import matplotlib  # heavy: imported on the first plot (see the module docstring)

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


def plot_routing_heatmap(
    shares: list[list[list[float]]],
    path: str,
    tasks: Sequence[str],
    layer_names: Sequence[str],
    scores: Sequence[float] | None = None,
    title: str = "expert load per task",
) -> None:
    """One panel per MoE layer, one row per task: each expert's share of the task's picks times
    the number of experts (1.0 = uniform, the colour map's centre). shares [L][S][E];
    `scores` (per layer) go in the panel titles."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm  # heavy: matplotlib, loaded by _pyplot just now

    arr = np.asarray(shares, dtype=float)  # [L,S,E]
    L, S, E = arr.shape
    rel = arr * E
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, float(rel.max())))
    width = min(max(6.0, 0.3 * E + 3), 24.0)
    height = min(L * (0.28 * S + 0.7) + 1.2, 60.0)
    fig, axes = plt.subplots(
        L, 1, figsize=(width, height), squeeze=False, sharex=True, layout="constrained"
    )
    for i, ax in enumerate(axes[:, 0]):
        im = ax.imshow(rel[i], cmap="coolwarm", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(S))
        ax.set_yticklabels(tasks, fontsize=8)
        label = layer_names[i] + (f"  (specialisation {scores[i]:.3f})" if scores else "")
        ax.set_title(label, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("expert")
    if E <= 64:
        axes[-1, 0].set_xticks(range(E))
        axes[-1, 0].tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="share of picks x experts", shrink=0.9)
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


def plot_panels(
    panels: dict[str, dict[str, tuple[list[float], list[float]]]],
    path: str,
    title: str,
    smooth_alpha: float | None = 0.1,
) -> None:
    """Panels side by side, one y-axis each ({panel title: {curve name: (x, y)}}): quantities
    of different scales against one step axis (R1's reward and response-length figures)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, (x, y) in series.items():
            ax.plot(x, y, alpha=0.3 if smooth_alpha else 1.0, color="tab:blue")
            if smooth_alpha:
                ax.plot(x, smooth(y, smooth_alpha), label=f"{label} (EMA)", color="tab:blue")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_bars(
    values: dict[str, float], path: str, title: str, ylabel: str, fmt: str = "{:.1%}"
) -> None:
    """One labelled bar per name (e.g. held-out accuracy per stage), the value printed on top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(values) + 1.5), 4.2))
    bars = ax.bar(list(values), list(values.values()), color="tab:blue")
    for bar, v in zip(bars, values.values()):
        ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    fig.clf()
    _pyplot().close(fig)
