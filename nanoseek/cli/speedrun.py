"""`nanoseek speedrun`: the whole recipe, stage by stage, with a report card (nanoseek/speedrun.py)."""

from __future__ import annotations

import argparse
import os

from nanoseek import speedrun as recipe
from nanoseek.cli.common import Command
from nanoseek.train.options import build


def _add_speedrun(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="run directory (default runs/speedrun); a re-run resumes it")
    p.add_argument("--preset", help="model preset (default tiny)")
    p.add_argument("--smoke", action="store_true", help="a handful of steps per stage (~1-2 min)")
    p.add_argument(
        "--fp8", action="store_true", help="pre-train with FP8 GEMMs + FP8-vs-BF16 stage"
    )
    p.add_argument("--config", help="TOML/JSON file of options (--key=value overrides it)")


def run_speedrun(args: argparse.Namespace) -> int:
    flags = {"smoke": True if args.smoke else None, "fp8": True if args.fp8 else None}
    opts = build(recipe.SpeedrunOptions, args.config, args.overrides, out=args.out,
                 preset=args.preset, **flags)  # fmt: skip
    card = recipe.run_speedrun(opts)
    final = card["stages"].get("r1", {}).get("result", {}).get("final_model")
    print(f"report card: {os.path.join(opts.out, 'report.md')}")
    if final:
        print(f"talk to the result:  nanoseek chat {final}")
        print(f"or serve it:         nanoseek serve {final} --port 8000")
    return 0


SPEEDRUN = Command(
    "speedrun",
    "the whole recipe on the built-in data: tokenizer, pre-training, R1 pipeline, "
    "distillation, speculative decoding, report card",
    _add_speedrun,
    run_speedrun,
    overrides=True,
)
