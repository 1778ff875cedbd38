"""The `nanoseek` command line: one subcommand per job, each a small `run_*` function.

    nanoseek speedrun --out runs/speedrun     # the whole recipe on the built-in data + report
    nanoseek info deepseek-v3                 # parameters, KV cache, FLOPs of a preset or dir
    nanoseek convert SRC DST --dtype fp8      # bf16/fp32/FP8 checkpoint -> another dtype
    nanoseek demo --out /tmp/tiny             # build, save, reload, check: the end-to-end smoke run
    nanoseek generate DIR --prompt 'Hi' --chat  # stream a completion (--speculative mtp)
    nanoseek routing DIR --tasks arithmetic countdown --out r/   # which experts each task uses
    nanoseek eval DIR --task addition --n 200 --k 8 --json     # held-out pass@1 / pass@k
    nanoseek rejection-sample --model DIR --task T --n-prompts 500 --samples 8 --out rs.jsonl
    nanoseek pipeline r1 --model BASE --task T --out runs/r1 --grpo.max_steps=100  # 4 stages
    nanoseek serve DIR --port 8000 --api-key KEY   # OpenAI-compatible API on 127.0.0.1
    nanoseek chat DIR                         # multi-turn chat, thinking dimmed

The subcommands live by concept: model.py (info, convert, demo), train.py (pretrain, sft,
distill, grpo, eval, rejection-sample, pipeline), infer.py (generate, routing, serve, chat);
common.py holds the `Command` record, the parser and the option types they share.

Adding a subcommand: in the module it belongs to, write `_add_<name>(parser)` for its flags and
`run_<name>(args) -> int`, and a `<NAME> = Command(...)` for them; then add that `Command` to
COMMANDS below (its place there is its place in `nanoseek --help`). Everything is imported at
module level except FastAPI and uvicorn (`nanoseek serve` imports them) and matplotlib
(nanoseek/analysis/plots.py, on the first plot).

User errors (bad config, bad checkpoint, missing file, bad argument) end as one line
`nanoseek: error: <message>` on stderr and exit code 2, never a traceback; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from nanoseek.cli import infer, model, speedrun, train
from nanoseek.cli.common import (
    PROG,
    USER_ERRORS,
    Command,
    Parser,
    UsageError,
    one_line,
    one_line_warning,
)
from nanoseek.cli.model import format_accounting, human, human_bytes, human_flops, resolve_config
from nanoseek.malloc import keep_freed_memory

__all__ = [
    "COMMANDS",
    "PROG",
    "USER_ERRORS",
    "Command",
    "UsageError",
    "build_parser",
    "format_accounting",
    "human",
    "human_bytes",
    "human_flops",
    "main",
    "resolve_config",
]

COMMANDS: list[Command] = [
    speedrun.SPEEDRUN,
    model.INFO,
    model.CONVERT,
    model.DEMO,
    infer.GENERATE,
    train.PRETRAIN,
    infer.ROUTING,
    train.SFT,
    train.DISTILL,
    train.GRPO,
    train.EVAL,
    train.REJECTION,
    train.PIPELINE,
    infer.SERVE,
    infer.CHAT,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="DeepSeek-V3 and the R1 recipe in small PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def _accepts_overrides(args: argparse.Namespace) -> bool:
    return any(c.overrides and c.run is args.run for c in COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nanoseek` console script and `python -m nanoseek`; returns the exit
    code (0 ok, 1 a check failed, 2 user error, 130 interrupted)."""
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra and not _accepts_overrides(args):
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        bad = [e for e in extra if not (e.startswith("--") and "=" in e)]
        if bad:
            raise UsageError(f"options must look like --key=value, got {' '.join(bad)}")
        args.overrides = extra
    except UsageError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    keep_freed_memory()  # this process is ours: big buffers reuse pages (nanoseek/malloc.py)
    with warnings.catch_warnings():  # restores the global hook on exit
        warnings.showwarning = one_line_warning
        try:
            return args.run(args)
        except USER_ERRORS as e:
            print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
