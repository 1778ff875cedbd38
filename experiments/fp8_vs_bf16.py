"""FP8 (fine-grained 1x128 / 128x128 scaling, emulated on CPU) vs BF16 pre-training.

    python experiments/fp8_vs_bf16.py --out runs/fp8 --max_steps=300

Trains the `tiny` preset twice on the same built-in corpus, tokenizer, data order and seed:
precision=bf16 (autocast, fp32 master weights) and precision=fp8 (nanoseek/fp8: every
projection, dense FFN, shared and routed expert GEMM in float8_e4m3fn, forward, input-gradient
and weight-gradient; embedding, head, router, norms and attention core in bf16/fp32). Prints
the relative difference of the smoothed final training loss (DeepSeek-V3 reports < 0.25%,
V3 §3.3) and the speed of both (on CPU FP8 is emulated: a numerics feature, not a speed one),
and writes OUT/fp8_vs_bf16.png with both loss curves.
"""

from __future__ import annotations

import argparse
import os
import shutil

from nanoseek.analysis.plots import plot_curves, read_metrics, smooth
from nanoseek.train.options import build
from nanoseek.train.pretrain import PretrainOptions, run_pretrain


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/fp8")
    args, overrides = p.parse_known_args(argv)
    runs = {}
    for precision in ("bf16", "fp8"):
        out = os.path.join(args.out, precision)
        if precision == "fp8":  # the same tokenizer and token shards as the bf16 run
            for sub in ("tokenizer", "data"):
                if not os.path.exists(os.path.join(out, sub)):
                    shutil.copytree(os.path.join(args.out, "bf16", sub), os.path.join(out, sub))
        opts = build(PretrainOptions, None, overrides, out=out, precision=precision)
        run_pretrain(opts, resume=True)
        runs[precision] = read_metrics(os.path.join(out, "metrics.jsonl"))
    final = {k: smooth([r["main_loss"] for r in v], 0.05)[-1] for k, v in runs.items()}
    speed = {k: sorted(r["tokens_per_s"] for r in v)[len(v) // 2] for k, v in runs.items()}
    rel = abs(final["fp8"] - final["bf16"]) / final["bf16"]
    print(f"\n{'precision':<10} {'smoothed final loss':>20} {'median tokens/s':>16}")
    for k in runs:
        print(f"{k:<10} {final[k]:>20.4f} {speed[k]:>16.0f}")
    print(f"relative loss difference: {100 * rel:.3f}% (target < 0.25%)")
    plot_curves(
        {k: ([r["step"] for r in v], [r["main_loss"] for r in v]) for k, v in runs.items()},
        os.path.join(args.out, "fp8_vs_bf16.png"),
        "tiny: FP8 vs BF16",
        "main loss",
    )


if __name__ == "__main__":
    main()
