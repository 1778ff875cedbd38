"""What every subcommand shares: the `Command` record, the parser that never exits, option
types, and how user errors and warnings are shown (one line, no traceback)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from nanoseek.checkpoint.io import CheckpointError
from nanoseek.config import ConfigError
from nanoseek.train.loop import TrainingDiverged

PROG = "nanoseek"
# OSError: missing file etc.; TrainingDiverged: a NaN loss, reported with the checkpoint kept
USER_ERRORS = (ConfigError, CheckpointError, OSError, ValueError, TrainingDiverged)


class UsageError(Exception):
    """A bad command line; raised instead of argparse's print-usage-and-exit."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit
        raise UsageError(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    overrides: bool = False  # accepts free --key=value options for its options dataclass


QUANTIZE_HELP = "decode with weight-only int8 weights: faster on CPU, output not token-identical"
# generate, chat, serve: the checkpoint streams into the int8 copies (nanoseek/infer/streamed.py)
LOAD_INT8_HELP = (
    "weight-only int8: the checkpoint streams tensor by tensor into int8 copies (a model larger"
    " than memory in bf16 fits), faster on CPU, output not token-identical"
)


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr)


def one_line(message: object) -> str:
    return " ".join(str(message).split())
