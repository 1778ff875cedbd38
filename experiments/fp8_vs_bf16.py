"""FP8 (fine-grained 1x128 / 128x128 scaling, emulated on CPU) vs BF16 pre-training, several seeds.

    python experiments/fp8_vs_bf16.py --out runs/fp8 --max_steps=300            # seeds 0 1 2
    python experiments/fp8_vs_bf16.py --out runs/fp8 --seeds 0 1 2 3 --precisions bf16 fp8

Trains the `tiny` preset on the built-in corpus once per seed and precision: bf16 (autocast, fp32
master weights), fp8 (nanoseek/fp8: every projection, dense FFN, shared and routed expert GEMM in
float8_e4m3fn, forward, input-gradient and weight-gradient; embedding, head, router, norms and
attention core in bf16/fp32) and fp32. The corpus, tokenizer, token shards and validation set are
built once (by the first seed) and shared; the seed sets the initialisation and the batch order,
so within one seed every precision sees the same batches and the losses are paired.

Per run: smoothed final training loss, mean of the last 10% of steps, final validation loss and
tokens/s (FP8 is emulated on CPU: a numerics feature, not a speed one). Per comparison (FP8
against each other precision) and number: FP8's relative gap in each seed, its mean and range,
beside the reference precision's own seed-to-seed spread ((max - min) / mean over the seeds).
Verdict rule: "gap larger than noise" when |mean gap| > that spread, otherwise "gap within
seed-to-seed noise" (DeepSeek-V3 reports |gap| < 0.25%, V3 §3.3). Each run lives in
OUT/seed-N/<precision>/ and a re-run skips finished ones (an interrupted one resumes). Writes
OUT/summary.md, OUT/summary.json and OUT/fp8_vs_bf16.png (every run's curve).
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

# fp32 is the reference for the weight gradients: under bf16 autocast the weight-gradient GEMM
# returns bf16 (rounded to 8 mantissa bits before the fp32 master update), while the FP8
# layer accumulates and returns it in fp32, as DeepSeek-V3's kernels do [V3 §3.3.2]
PRECISIONS = ("bf16", "fp8", "fp32")
NUMBERS = ("smoothed_final", "last_10pct", "val_loss")  # lower is better, compared relatively
LABELS = {"smoothed_final": "smoothed final loss", "last_10pct": "mean of last 10% of steps",
          "val_loss": "val loss", "tokens_per_s": "tokens/s", "wall_s": "wall s"}  # fmt: skip


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
    n = max(1, len(rows) // 10)  # the last 10% of steps
    wall_path = os.path.join(out, "wall.json")
    return {
        "steps": rows[-1]["step"],
        "smoothed_final": smooth([r["main_loss"] for r in rows], 0.05)[-1],
        "last_10pct": sum(r["main_loss"] for r in rows[-n:]) / n,
        "val_loss": [r["val_loss"] for r in rows if r.get("val_loss") is not None][-1],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "wall_s": json.load(open(wall_path))["wall_s"] if os.path.isfile(wall_path) else None,
        "curve": ([r["step"] for r in rows], [r["main_loss"] for r in rows]),
    }


def compare(results: dict, seeds: list[int], test: str, ref: str) -> dict:
    """Per number: `test`'s relative gap to `ref` per seed (%), its mean and range, `ref`'s
    seed-to-seed spread (%) and the verdict."""
    out = {}
    for key in NUMBERS:
        gaps = [100 * (results[s][test][key] / results[s][ref][key] - 1) for s in seeds]
        refs = [results[s][ref][key] for s in seeds]
        spread = 100 * (max(refs) - min(refs)) / statistics.mean(refs)
        mean = statistics.mean(gaps)
        out[key] = {"gaps_pct": gaps, "mean_pct": mean, "min_pct": min(gaps),
                    "max_pct": max(gaps), "ref_spread_pct": spread,
                    "verdict": "gap larger than noise" if abs(mean) > spread
                    else "gap within seed-to-seed noise"}  # fmt: skip
    return out


def summary_md(results: dict, comparisons: dict, seeds: list[int], precisions: list[str]) -> str:
    cols = (*NUMBERS, "tokens_per_s", "wall_s")
    lines = ["| seed | precision | " + " | ".join(LABELS[c] for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]  # fmt: skip
    for s in seeds:
        for p in precisions:
            r = results[s][p]
            cells = [f"{r[c]:.4f}" for c in NUMBERS] + [f"{r['tokens_per_s']:,.0f}"]
            cells.append("-" if r["wall_s"] is None else f"{r['wall_s']:.0f}")
            lines.append(f"| {s} | {p} | " + " | ".join(cells) + " |")
    for name, comp in comparisons.items():
        test, ref = name.split("_vs_")
        lines += ["", f"**{test.upper()} - {ref.upper()}** (relative %, per seed paired; "
                  f"{ref.upper()} spread = (max - min) / mean of {ref.upper()} over the seeds)", "",
                  "| number | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | mean | min / max | " + f"{ref.upper()} spread | verdict |",
                  "|---|" + "---:|" * (len(seeds) + 3) + "---|"]  # fmt: skip
        for key, c in comp.items():
            lines.append(f"| {LABELS[key]} | " + " | ".join(f"{g:+.2f}" for g in c["gaps_pct"])
                         + f" | {c['mean_pct']:+.2f} | {c['min_pct']:+.2f} / {c['max_pct']:+.2f}"
                         f" | {c['ref_spread_pct']:.2f} | {c['verdict']} |")  # fmt: skip
    lines += ["", "Verdict rule: gap larger than noise when |mean gap| > the reference's "
              "seed-to-seed spread. DeepSeek-V3 reports |FP8 - BF16| < 0.25% (V3 §3.3)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/fp8")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                   help="bf16 and fp8 always; fp32 optional")  # fmt: skip
    args, overrides = p.parse_known_args(argv)
    precisions = [q for q in PRECISIONS if q in args.precisions]
    if "bf16" not in precisions or "fp8" not in precisions:
        p.error("--precisions must include bf16 and fp8")
    seeds, shared, results = list(dict.fromkeys(args.seeds)), None, {}
    for seed in seeds:
        results[seed] = {}
        for precision in precisions:
            out = os.path.join(args.out, f"seed-{seed}", precision)
            opts = build(PretrainOptions, None, overrides, out=out, precision=precision, seed=seed)
            if finished(out, opts.max_steps):
                print(f"seed {seed} {precision}: finished, skipped", flush=True)
            else:
                print(f"seed {seed} {precision}: training into {out}", flush=True)
                train(opts, shared)
            shared = shared or out
            results[seed][precision] = numbers(out)
    comparisons = {f"fp8_vs_{ref}": compare(results, seeds, "fp8", ref)
                   for ref in precisions if ref != "fp8"}  # fmt: skip
    md = summary_md(results, comparisons, seeds, precisions)
    print("\n" + md)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        runs = {s: {p: {k: v for k, v in r.items() if k != "curve"} for p, r in d.items()}
                for s, d in results.items()}  # fmt: skip
        json.dump({"seeds": seeds, "precisions": precisions, "runs": runs,
                   "comparisons": comparisons}, f, indent=2)  # fmt: skip
    plot_curves(
        {f"{p} seed {s}": results[s][p]["curve"] for s in seeds for p in precisions},
        os.path.join(args.out, "fp8_vs_bf16.png"),
        "tiny: FP8 vs BF16" + (" vs FP32" if "fp32" in precisions else "") + ", every seed",
        "main loss",
    )


if __name__ == "__main__":
    main()
