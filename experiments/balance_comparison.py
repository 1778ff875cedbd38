"""Auxiliary-loss-free balancing vs a classic auxiliary loss, same data, seed and budget.

    python experiments/balance_comparison.py --out runs/balance --max_steps=400

Trains the `tiny` preset three times on the built-in corpus: `balance=aux_free` (bias updates,
gamma 1e-3, plus the 1e-4 sequence-wise loss; V3 §2.1.2), the same with gamma 1e-2, and
`balance=aux_loss` (batch-wise auxiliary loss, alpha 0.01; DeepSeekMoE / V2). Prints validation loss and MaxVio (the aux-loss-free paper,
arXiv 2408.15664, reports MaxVio_global ~0.04 against several tenths with a lower perplexity)
and writes OUT/balance_maxvio.png. The tokenizer and token shards are shared by all runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from nanoseek.analysis.plots import plot_curves, read_metrics
from nanoseek.train.options import build
from nanoseek.train.pretrain import PretrainOptions, run_pretrain

# V3's gamma (1e-3) was set for 14.8T tokens; a few hundred steps move each bias by at most
# steps x gamma, so a faster gamma is compared too
RUNS = {
    "aux_free": {"balance": "aux_free"},
    "aux_free_g0.01": {"balance": "aux_free", "bias_update_speed": 0.01},
    "aux_loss": {"balance": "aux_loss"},
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/balance")
    args, overrides = p.parse_known_args(argv)
    results = {}
    for strategy, extra in RUNS.items():
        out = os.path.join(args.out, strategy)
        opts = build(PretrainOptions, None, overrides, out=out, plot=True, **extra)
        shared = os.path.join(args.out, "aux_free")
        if strategy != "aux_free":  # same tokenizer and token shards as the first run
            for sub in ("tokenizer", "data"):
                if not os.path.exists(os.path.join(out, sub)):
                    shutil.copytree(os.path.join(shared, sub), os.path.join(out, sub))
        run_pretrain(opts, resume=True)
        records = read_metrics(os.path.join(out, "metrics.jsonl"))
        tail = records[-max(1, len(records) // 10) :]  # the last 10% of steps
        val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        results[strategy] = {
            "val_loss": val[-1] if val else float("nan"),
            "maxvio_global": sum(r["maxvio_global"] for r in tail) / len(tail),
            "maxvio_mean_layer": sum(r["maxvio_mean"] for r in tail) / len(tail),
            "steps": records[-1]["step"],
            "curve": ([r["step"] for r in records], [r["maxvio_mean"] for r in records]),
        }
    print(f"\n{'strategy':<15} {'val loss':>9} {'MaxVio (global)':>16} {'MaxVio (per layer)':>19}")
    for name, r in results.items():
        print(
            f"{name:<15} {r['val_loss']:>9.4f} {r['maxvio_global']:>16.3f} "
            f"{r['maxvio_mean_layer']:>19.3f}"
        )
    print("(MaxVio averaged over the last 10% of steps; per layer = mean over MoE layers)")
    plot_curves(
        {k: v["curve"] for k, v in results.items()},
        os.path.join(args.out, "balance_maxvio.png"),
        "MaxVio per step (mean over MoE layers)",
        "MaxVio",
    )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in results.items()},
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
