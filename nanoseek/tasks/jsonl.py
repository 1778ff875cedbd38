"""User tasks from JSONL files: one `{"question": ..., "answer": ...}` object per line.

Optional fields: "solution" (worked solution for SFT/corpus documents), "level" (int, default 1),
"id", "metadata" (object). "prompt" is accepted as a synonym of "question". Answers are compared
by `answers_match`: numbers by value whatever their dress ("$1,080."), mathematics by Math-Verify,
else as whitespace-normalised text; a GSM8K-style worked answer ("... #### 72") is judged on its
final value.

The file's problems keep the same hash split as generated ones (on the question text), so a
user's file is held out the same way: `generate(n, "test")` returns only its test problems.

    task = register_task(JsonlTask("mymath", "mymath.jsonl"))
    problems = get_task("mymath").generate(8, "test")
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from typing import Any

from nanoseek.tasks.base import Problem, Task, TaskError, key_digest


def load_jsonl(path: str | os.PathLike, task: str = "jsonl") -> list[Problem]:
    """Read problems from a JSONL file; errors name the file and the 1-based line number."""
    problems = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as err:
        raise TaskError(f"{path}: cannot open task file ({err.strerror})") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, say) are not errors
            problems.append(_parse_line(line, path, lineno, task))
    if not problems:
        raise TaskError(f"{path}: no problems in file")
    return problems


def _parse_line(line: str, path: str | os.PathLike, lineno: int, task: str) -> Problem:
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
    )


class JsonlTask(Task):
    """A fixed set of problems from a JSONL file (or a list), sampled with replacement."""

    def __init__(self, name: str, source: str | os.PathLike | list[Problem]) -> None:
        self.name = name
        if isinstance(source, list):
            self.problems = list(source)
        else:
            self.problems = load_jsonl(source, task=name)
        if not self.problems:
            raise TaskError(f"task {name!r} has no problems")
        self.levels = tuple(sorted({p.level for p in self.problems}))
        origin = "a list" if isinstance(source, list) else os.fspath(source)
        self.description = f"{len(self.problems)} problems from {origin}"

    def sample(self, rng: random.Random, level: int) -> Problem | None:
        pool = [p for p in self.problems if p.level == level]
        return rng.choice(pool) if pool else None

    def _draw(
        self, rng: random.Random, split: str, level: int | None, unique: bool
    ) -> Iterator[Problem]:
        # draw from the split's own pool rather than by rejection: same split, no wasted draws
        pool = [p for p in self.problems if p.split == split and level in (None, p.level)]
        if not pool:
            at = "" if level is None else f" at level {level}"
            raise TaskError(
                f"task {self.name!r} has no {split} problems{at} ({len(self.problems)} in all; "
                "the split is a hash of each question)"
            )
        if unique:
            return self._each_once(rng.sample(pool, len(pool)), split)
        return self._endless(rng, pool)

    @staticmethod
    def _endless(rng: random.Random, pool: list[Problem]) -> Iterator[Problem]:
        while True:
            yield rng.choice(pool)

    def _each_once(self, order: list[Problem], split: str) -> Iterator[Problem]:
        yield from order
        raise TaskError(f"task {self.name!r} has only {len(order)} unique {split} problems")
