"""User tasks from JSONL files: one `{"question": ..., "answer": ...}` object per line.

Optional fields: "solution" (worked solution for SFT/corpus documents), "level" (int, default 1),
"id", "metadata" (object), "split" ("train" or "test"). "prompt" is accepted as a synonym of
"question". Answers are compared by `answers_match`: numbers by value whatever their dress
("$1,080."), mathematics by Math-Verify, else as whitespace-normalised text; a GSM8K-style worked
answer ("... #### 72") is judged on its final value.

Splits. A row's "split" field pins its problem to that split. The other rows take the split the
file was given as (`split="train"`: a training set, trained on whole; `split="test"`: a test set,
evaluated whole), or, with `split=None`, the same 10% hash split as generated problems (on the
question text) - for a file that serves both training and evaluation, so that nothing evaluated
is ever trained on. Draws go through the split in epochs, each a seeded permutation (without
replacement), so n = len(split) draws cover every problem once.

    task = register_task(JsonlTask("mymath", "mymath.jsonl"))
    problems = get_task("mymath").generate(8, "test")
    train = JsonlTask("gsm8k", "train.jsonl", split="train")  # every row a training problem
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator
from typing import Any

from nanoseek.tasks.base import SPLITS, Problem, Task, TaskError, key_digest


def load_jsonl(
    path: str | os.PathLike, task: str = "jsonl", split: str | None = None
) -> list[Problem]:
    """Read problems from a JSONL file; errors name the file and the 1-based line number.
    Rows without a "split" field get `split` (None: the hash split of their question)."""
    _check_split(split)
    problems = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as err:
        raise TaskError(f"{path}: cannot open task file ({err.strerror})") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, say) are not errors
            problems.append(_parse_line(line, path, lineno, task, split))
    if not problems:
        raise TaskError(f"{path}: no problems in file")
    return problems


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise TaskError(f"split must be one of {SPLITS} or None (the hash split), got {split!r}")


def _parse_line(
    line: str, path: str | os.PathLike, lineno: int, task: str, split: str | None
) -> Problem:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise TaskError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
    question = row.get("question", row.get("prompt"))
    if not isinstance(question, str) or not question.strip():
        raise TaskError(f"{where}: missing or empty 'question' (or 'prompt') string")
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TaskError(f"{where}: 'answer' must be a string or a number, got {answer!r}")
    answer = str(answer).strip()
    if not answer:
        raise TaskError(f"{where}: empty 'answer'")
    level = row.get("level", 1)
    if isinstance(level, bool) or not isinstance(level, int):
        raise TaskError(f"{where}: 'level' must be an integer, got {level!r}")
    solution = row.get("solution", "")
    if not isinstance(solution, str):
        raise TaskError(f"{where}: 'solution' must be a string")
    metadata: Any = row.get("metadata", {})
    if not isinstance(metadata, dict):
        raise TaskError(f"{where}: 'metadata' must be an object")
    pinned = row.get("split", split)
    if pinned is not None and pinned not in SPLITS:
        raise TaskError(f'{where}: \'split\' must be "train" or "test", got {pinned!r}')
    key = " ".join(question.split())  # whitespace changes do not move a problem between splits
    return Problem(
        id=str(row.get("id", f"{task}-{key_digest(key)}")),
        task=task,
        question=question,
        answer=answer,
        solution=solution or f"So the answer is {answer}.",
        level=level,
        key=key,
        metadata=metadata,
        pinned_split=pinned,
    )


def is_task_file(path: str | os.PathLike) -> bool:
    """A JSONL file whose first record is a task problem (question or prompt, and answer; no
    'messages' or 'completion'): what `--task` reads, not SFT data."""
    p = os.fspath(path)
    if not p.lower().endswith((".jsonl", ".ndjson")) or not os.path.isfile(p):
        return False
    with open(p, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return (
                    isinstance(row, dict)
                    and "answer" in row
                    and bool({"question", "prompt"} & set(row))
                    and not {"messages", "completion", "text"} & set(row)
                )
    return False


class JsonlTask(Task):
    """A fixed set of problems from a JSONL file (or a list), drawn in epochs without
    replacement. `split` is the split of rows that state none (module docstring)."""

    def __init__(
        self, name: str, source: str | os.PathLike | list[Problem], split: str | None = None
    ) -> None:
        _check_split(split)
        self.name, self.given_as = name, split
        if isinstance(source, list):
            self.problems = [
                p if p.pinned_split or split is None else dataclasses.replace(p, pinned_split=split)
                for p in source
            ]
        else:
            self.problems = load_jsonl(source, task=name, split=split)
        if not self.problems:
            raise TaskError(f"task {name!r} has no problems")
        self.levels = tuple(sorted({p.level for p in self.problems}))
        self.origin = "a list" if isinstance(source, list) else os.fspath(source)
        n_test = sum(p.split == "test" for p in self.problems)
        self.description = (
            f"{len(self.problems)} problems from {self.origin} "
            f"({len(self.problems) - n_test} train, {n_test} test)"
        )

    def sample(self, rng: random.Random, level: int) -> Problem | None:
        pool = [p for p in self.problems if p.level == level]
        return rng.choice(pool) if pool else None

    def _pool(self, split: str, level: int | None) -> list[Problem]:
        return [p for p in self.problems if p.split == split and level in (None, p.level)]

    def count(self, split: str, level: int | None = None) -> int:
        return len(self._pool(split, level))

    def _draw(
        self, rng: random.Random, split: str, level: int | None, unique: bool
    ) -> Iterator[Problem]:
        # draw from the split's own pool rather than by rejection: same split, no wasted draws
        pool = self._pool(split, level)
        if not pool:
            at = "" if level is None else f" at level {level}"
            how = (
                "rows without a 'split' field are split by a 10% hash of the question"
                if self.given_as is None
                else f"{self.origin} was given as a {self.given_as} set and no row says "
                f'"split": "{split}"'
            )
            raise TaskError(
                f"task {self.name!r} has no {split} problems{at} ({len(self.problems)} in all; "
                f"{how})"
            )
        if unique:
            return self._each_once(rng.sample(pool, len(pool)), split)
        return self._epochs(rng, pool)

    @staticmethod
    def _epochs(rng: random.Random, pool: list[Problem]) -> Iterator[Problem]:
        # the first epoch is the order `unique=True` gives: a unique prefix extends to epochs
        while True:
            yield from rng.sample(pool, len(pool))

    def _each_once(self, order: list[Problem], split: str) -> Iterator[Problem]:
        yield from order
        raise TaskError(f"task {self.name!r} has only {len(order)} unique {split} problems")
