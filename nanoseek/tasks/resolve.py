"""A `--task` value -> a Task: a registered name, or a task JSONL file and the split it is given as.

Who decides a file's split: the command it is given to. A trainer's task file is a training set
(`split="train"`, trained on whole), `nanoseek eval`'s or an `--eval_task` file a test set
(`split="test"`, evaluated whole), and a file that one run both trains and evaluates on keeps the
hash split (`split=None`, the default: nothing evaluated is ever trained on). Rows with their own
"split" field keep it in every case (nanoseek/tasks/jsonl.py). Registered (generated) tasks
ignore `split`: their problems always keep the hash split of their content.
"""

from __future__ import annotations

import os
from pathlib import Path

from nanoseek.tasks.base import Task, TaskError, get_task
from nanoseek.tasks.jsonl import JsonlTask

DEFAULT_DRAWS = 1000  # problems drawn from a generated task when no number is given
DEFAULT_EVAL_N = 100  # held-out problems of a generated task `nanoseek eval` asks by default


def resolve_task(name: str, split: str | None = None) -> Task:
    """A registered task name, or a task JSONL file ({"question", "answer", "solution"} lines)
    whose rows without a "split" field are all `split` (None: hash split); an unknown name
    raises an error listing the valid ones."""
    if os.path.isfile(name):
        return JsonlTask(Path(name).stem, name, split=split)
    if name.lower().endswith((".jsonl", ".ndjson")) or os.sep in name:
        raise TaskError(f"{name}: no such task file")
    return get_task(name)


def same_file(a: str | None, b: str | None) -> bool:
    """Do two task values name the same existing file (so one run would train and evaluate on
    it)?"""
    return bool(a and b and os.path.isfile(a) and os.path.isfile(b) and os.path.samefile(a, b))


def draws(task: Task, n: int | None, split: str = "train", level: int | None = None) -> int:
    """How many problems to draw: `n`, or when None every problem of a task file's split once
    (DEFAULT_DRAWS of a generated task)."""
    if n is not None:
        return n
    count = task.count(split, level)
    return DEFAULT_DRAWS if count is None else count
