"""Auxiliary-loss-free balancing vs a classic auxiliary loss, same data and budget, several seeds.

    python experiments/balance_comparison.py --out runs/balance --max_steps=400   # seeds 0 1 2
    python experiments/balance_comparison.py --out runs/balance --seeds 0 1 2 3 4

Trains the `tiny` preset on the built-in corpus once per seed and strategy: `balance=aux_free`
(bias updates, gamma 1e-3, plus the 1e-4 sequence-wise loss; V3 §2.1.2), the same with gamma
1e-2, and `balance=aux_loss` (batch-wise auxiliary loss, alpha 0.01; DeepSeekMoE / V2). The
corpus, tokenizer, token shards and validation set are built once (by the first seed) and shared;
the seed sets the initialisation and the batch order, so within one seed every strategy sees the
same batches.

Per run: smoothed final training loss, mean of the last 10% of steps, final validation loss, and
MaxVio (global, and the mean over MoE layers) averaged over the last 10% of steps. Per
aux-loss-free variant and number: its gap to the classic loss in each seed (relative % for the
losses, absolute for MaxVio), its mean and range, beside the classic loss's own seed-to-seed
spread (max - min over the seeds, relative to its mean for the losses). Verdict rule: "gap larger
than noise" when |mean gap| > that spread, otherwise "gap within seed-to-seed noise". The
aux-loss-free paper (arXiv 2408.15664) reports MaxVio_global ~0.04 against several tenths with a
lower perplexity. Each run lives in OUT/seed-N/<strategy>/ and a re-run skips finished ones (an
interrupted one resumes). Writes OUT/summary.md, OUT/summary.json and OUT/balance_maxvio.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

from nanoseek.analysis.plots import plot_curves, read_metrics, smooth
from nanoseek.train.options import build
from nanoseek.train.pretrain import PretrainOptions, run_pretrain

# V3's gamma (1e-3) was set for 14.8T tokens; a few hundred steps move each bias by at most
# steps x gamma, so a faster gamma is compared too
RUNS = {
    "aux_free": {"balance": "aux_free"},
    "aux_free_g0.01": {"balance": "aux_free", "bias_update_speed": 0.01},
    "aux_loss": {"balance": "aux_loss"},
}
REF = "aux_loss"
LOSSES = ("smoothed_final", "last_10pct", "val_loss")  # gaps relative (%)
MAXVIO = ("maxvio_global", "maxvio_mean_layer")  # gaps absolute
LABELS = {"smoothed_final": "smoothed final loss", "last_10pct": "mean of last 10% of steps",
          "val_loss": "val loss", "maxvio_global": "MaxVio global",
          "maxvio_mean_layer": "MaxVio mean per layer", "wall_s": "wall s"}  # fmt: skip


def finished(out: str, max_steps: int) -> bool:
    """The exported model is there and the metrics reach the last step."""
    path = os.path.join(out, "metrics.jsonl")
    if not (os.path.isfile(os.path.join(out, "model", "config.json")) and os.path.isfile(path)):
        return False
    rows = read_metrics(path)
    return bool(rows) and rows[-1]["step"] >= max_steps


def train(opts: PretrainOptions, shared: str | None) -> None:
    """One run, resumed where a previous attempt stopped; its wall time adds up in wall.json."""
    if shared is not None:  # the same tokenizer and token shards as the first run
        for sub in ("tokenizer", "data"):
            if not os.path.exists(os.path.join(opts.out, sub)):
                shutil.copytree(os.path.join(shared, sub), os.path.join(opts.out, sub))
    wall_path = os.path.join(opts.out, "wall.json")
    before = json.load(open(wall_path))["wall_s"] if os.path.isfile(wall_path) else 0.0
    t0 = time.perf_counter()
    run_pretrain(opts, resume=True)
    with open(wall_path, "w") as f:
        json.dump({"wall_s": before + time.perf_counter() - t0}, f)


def numbers(out: str) -> dict:
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    tail = rows[-max(1, len(rows) // 10) :]  # the last 10% of steps
    wall_path = os.path.join(out, "wall.json")
    return {
        "steps": rows[-1]["step"],
        "smoothed_final": smooth([r["main_loss"] for r in rows], 0.05)[-1],
        "last_10pct": sum(r["main_loss"] for r in tail) / len(tail),
        "val_loss": [r["val_loss"] for r in rows if r.get("val_loss") is not None][-1],
        "maxvio_global": sum(r["maxvio_global"] for r in tail) / len(tail),
        "maxvio_mean_layer": sum(r["maxvio_mean"] for r in tail) / len(tail),
        "wall_s": json.load(open(wall_path))["wall_s"] if os.path.isfile(wall_path) else None,
        "curve": ([r["step"] for r in rows], [r["maxvio_mean"] for r in rows]),
    }


def compare(results: dict, seeds: list[int], test: str) -> dict:
    """Per number: `test`'s gap to the classic loss per seed, its mean and range, the classic
    loss's seed-to-seed spread and the verdict (relative % for losses, absolute for MaxVio)."""
    out = {}
    for key in (*LOSSES, *MAXVIO):
        refs = [results[s][REF][key] for s in seeds]
        if key in LOSSES:
            gaps = [100 * (results[s][test][key] / results[s][REF][key] - 1) for s in seeds]
            spread = 100 * (max(refs) - min(refs)) / statistics.mean(refs)
        else:
            gaps = [results[s][test][key] - results[s][REF][key] for s in seeds]
            spread = max(refs) - min(refs)
        mean = statistics.mean(gaps)
        out[key] = {"gaps": gaps, "mean": mean, "min": min(gaps), "max": max(gaps),
                    "ref_spread": spread, "unit": "%" if key in LOSSES else "absolute",
                    "verdict": "gap larger than noise" if abs(mean) > spread
                    else "gap within seed-to-seed noise"}  # fmt: skip
    return out


def summary_md(results: dict, comparisons: dict, seeds: list[int]) -> str:
    cols = (*LOSSES, *MAXVIO, "wall_s")
    lines = ["| seed | strategy | " + " | ".join(LABELS[c] for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]  # fmt: skip
    for s in seeds:
        for name, r in results[s].items():
            cells = [f"{r[c]:.4f}" for c in LOSSES] + [f"{r[c]:.3f}" for c in MAXVIO]
            cells.append("-" if r["wall_s"] is None else f"{r['wall_s']:.0f}")
            lines.append(f"| {s} | {name} | " + " | ".join(cells) + " |")
    for name, comp in comparisons.items():
        lines += ["", f"**{name} - {REF}** (per seed paired; losses relative %, MaxVio absolute; "
                  f"{REF} spread = max - min of {REF} over the seeds)", "",
                  "| number | " + " | ".join(f"seed {s}" for s in seeds)
                  + f" | mean | min / max | {REF} spread | verdict |",
                  "|---|" + "---:|" * (len(seeds) + 3) + "---|"]  # fmt: skip
        for key, c in comp.items():
            fmt = "{:+.2f}" if key in LOSSES else "{:+.3f}"
            lines.append(f"| {LABELS[key]} | " + " | ".join(fmt.format(g) for g in c["gaps"])
                         + f" | {fmt.format(c['mean'])} | {fmt.format(c['min'])} / "
                         f"{fmt.format(c['max'])} | {fmt.format(c['ref_spread'])[1:]} "
                         f"| {c['verdict']} |")  # fmt: skip
    lines += ["", "MaxVio averaged over the last 10% of steps; per layer = mean over MoE layers. "
              "Verdict rule: gap larger than noise when |mean gap| > the classic loss's "
              "seed-to-seed spread."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/balance")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args, overrides = p.parse_known_args(argv)
    seeds, shared, results = list(dict.fromkeys(args.seeds)), None, {}
    for seed in seeds:
        results[seed] = {}
        for strategy, extra in RUNS.items():
            out = os.path.join(args.out, f"seed-{seed}", strategy)
            opts = build(PretrainOptions, None, overrides, out=out, seed=seed, **extra)
            if finished(out, opts.max_steps):
                print(f"seed {seed} {strategy}: finished, skipped", flush=True)
            else:
                print(f"seed {seed} {strategy}: training into {out}", flush=True)
                train(opts, shared)
            shared = shared or out
            results[seed][strategy] = numbers(out)
    comparisons = {name: compare(results, seeds, name) for name in RUNS if name != REF}
    md = summary_md(results, comparisons, seeds)
    print("\n" + md)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        runs = {s: {k: {kk: vv for kk, vv in r.items() if kk != "curve"} for k, r in d.items()}
                for s, d in results.items()}  # fmt: skip
        json.dump({"seeds": seeds, "reference": REF, "runs": runs,
                   "comparisons": comparisons}, f, indent=2)  # fmt: skip
    plot_curves(
        {f"{k} seed {s}": results[s][k]["curve"] for s in seeds for k in RUNS},
        os.path.join(args.out, "balance_maxvio.png"),
        "MaxVio per step (mean over MoE layers), every seed",
        "MaxVio",
    )


if __name__ == "__main__":
    main()
