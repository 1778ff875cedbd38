"""Problems, tasks, the train/test split and the task registry.

A task family generates `Problem`s (question, ground-truth answer, worked solution) from a seed and
verifies answers by rule, which is all R1-Zero-style RL needs (R1 §2.2.2: rule-based rewards,
no reward model). The same problems feed the built-in pre-training corpus (`nanoseek.data.corpus`),
SFT, GRPO rewards and evaluation, so the split between them has to be airtight:

A problem's split is a hash of its canonical content (`Problem.key`, e.g. "+:17,25"), never of the
seed or of the order of generation. Generators draw candidates and drop those of the other split,
so no seed, level or task mix can ever put a test problem into training data. Commutative problems
share one key (17 + 25 and 25 + 17), and the key does not name the task, so `addition` and
`arithmetic` agree on which sums are held out.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from nanoseek.tasks.extract import answers_match, extract_answer

SPLITS = ("train", "test")
# Changing this moves problems between splits: a trained checkpoint would then have seen "test"
# problems. Treat it as part of the data format.
TEST_FRACTION = 0.1
MAX_ANSWER_CHARS = 1000
_MAX_MISSES = 20_000  # consecutive rejected candidates before we call a stream exhausted


class TaskError(ValueError):
    """A bad task request or task file: unknown name, level or split, a malformed JSONL line."""


def split_of(key: str, test_fraction: float = TEST_FRACTION) -> str:
    """The split ("train" or "test") of a problem's canonical content, the same on any machine."""
    # blake2b, not hash(): Python salts str hashes per process (PYTHONHASHSEED)
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") / 2**64 < test_fraction else "train"


def key_digest(key: str) -> str:
    """A short stable hex digest of a canonical key, used in problem ids."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=6).hexdigest()


@dataclass
class Problem:
    """One verifiable problem.

    `solution` is a worked, step-by-step solution whose last line states `answer`; tests check
    that every generated `answer` verifies, so the corpus never teaches a wrong result. `key` is
    the canonical content the split is derived from (empty: the question text). `pinned_split`
    overrides that hash for problems whose split their source states (a task file given as a
    training or a test set, a JSONL row's "split" field); generated problems never set it.
    """

    id: str
    task: str
    question: str
    answer: str
    solution: str = ""
    level: int = 1
    key: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    pinned_split: str | None = None

    @property
    def split(self) -> str:
        return self.pinned_split or split_of(self.key or self.question)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return cls(**d)


class Task(ABC):
    """A family of verifiable problems with difficulty levels.

    Subclasses set `name`, `levels` and `description`, implement `sample` (draw one candidate
    problem) and usually `check` (is an extracted answer right?). `generate`, `stream` and `verify`
    are shared so every task gets the same split, determinism and untrusted-input handling.
    """

    name: str = ""
    levels: tuple[int, ...] = (1,)
    description: str = ""

    @abstractmethod
    def sample(self, rng: random.Random, level: int) -> Problem | None:
        """Draw one candidate problem at `level`, or None to have the caller draw again."""

    def check(self, problem: Problem, answer: str) -> bool:
        """Is the extracted `answer` correct? Default: equal by value, else as normalised text."""
        return answers_match(problem.answer, answer)

    def verify(self, problem: Problem, answer_text: str) -> bool:
        """Is `answer_text` a correct answer to `problem`? Never raises on untrusted text.

        `answer_text` may be a bare answer ("42") or a completion: the last `<answer>` tag or
        `\\boxed{}` is used when present. See `verify_completion` for the strict RL variant.
        """
        answer = extract_answer(answer_text, fallback="text")
        if answer is None or len(answer) > MAX_ANSWER_CHARS:
            return False
        try:
            return bool(self.check(problem, answer))
        except (ValueError, ArithmeticError, RecursionError):
            return False

    def verify_completion(self, problem: Problem, completion: str) -> bool:
        """Strict check of a model completion: the answer must be inside `<answer>`/`\\boxed{}`."""
        answer = extract_answer(completion, fallback="none")
        return answer is not None and self.verify(problem, answer)

    def count(self, split: str, level: int | None = None) -> int | None:
        """How many distinct problems `split` holds (at `level`), or None when the task
        generates them without a known end (every built-in family)."""
        return None

    def make_problem(
        self, key: str, question: str, answer: str, solution: str, level: int, **metadata: Any
    ) -> Problem:
        """Build a Problem whose id and split derive from `key` (for use in `sample`)."""
        return Problem(
            id=f"{self.name}-{key_digest(key)}",
            task=self.name,
            question=question,
            answer=answer,
            solution=solution,
            level=level,
            key=key,
            metadata=metadata,
        )

    def _check_args(self, split: str, level: int | None) -> None:
        if split not in SPLITS:
            raise TaskError(f"split must be one of {SPLITS}, got {split!r}")
        if level is not None and level not in self.levels:
            raise TaskError(
                f"task {self.name!r} has no level {level!r}; valid levels: "
                f"{', '.join(map(str, self.levels))}"
            )

    def stream(
        self, split: str = "train", seed: int = 0, level: int | None = None, *, unique: bool = False
    ) -> Iterator[Problem]:
        """Endless problems of `split`, deterministic in (task name, split, seed, level).

        `level=None` draws each problem's level uniformly from `levels`. With `unique=True` a
        problem never repeats; a small problem space (1-digit sums) then runs dry and raises
        TaskError instead of looping forever. Arguments are checked now, not at the first draw.
        """
        self._check_args(split, level)
        # a str seed goes through sha512 inside random.Random: stable across processes
        rng = random.Random(f"{self.name}|{split}|{seed}|{level}")
        return self._draw(rng, split, level, unique)

    def _draw(
        self, rng: random.Random, split: str, level: int | None, unique: bool
    ) -> Iterator[Problem]:
        """Rejection sampling: draw candidates, keep those whose hash split is `split`."""
        seen: set[str] = set()
        misses = 0
        while True:
            lvl = level if level is not None else rng.choice(self.levels)
            problem = self.sample(rng, lvl)
            if (
                problem is None
                or problem.split != split
                or (unique and (problem.key or problem.question) in seen)
            ):
                misses += 1
                if misses > _MAX_MISSES:
                    at = "" if level is None else f" at level {level}"
                    raise TaskError(
                        f"task {self.name!r} found no new {split} problem{at} in {_MAX_MISSES} "
                        f"draws (after {len(seen)} unique ones); the problem space is too small "
                        "for this request"
                    )
                continue
            misses = 0
            if unique:
                seen.add(problem.key or problem.question)
            yield problem

    def generate(
        self,
        n: int,
        split: str = "train",
        seed: int = 0,
        level: int | None = None,
        *,
        unique: bool = False,
    ) -> list[Problem]:
        """`n` problems of `split` (a prefix of `stream`, so a larger n extends a smaller one)."""
        if n < 0:
            raise TaskError(f"n must be >= 0, got {n}")
        return list(itertools.islice(self.stream(split, seed, level, unique=unique), n))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, levels={self.levels})"


# name -> task instance. Filled by the family modules on import (see nanoseek/tasks/__init__.py).
TASKS: dict[str, Task] = {}


def register_task(task: Any = None, *, name: str | None = None, overwrite: bool = False) -> Any:
    """Add a task to the registry.

    Call with an instance (`register_task(MyTask())`), or decorate a Task subclass whose
    constructor needs no arguments (`@register_task`). `name` overrides `task.name`. Returns what
    it was given, so it works as a decorator.
    """
    if task is None:  # @register_task(name=...) with arguments
        return lambda t: register_task(t, name=name, overwrite=overwrite)
    instance = task() if isinstance(task, type) else task
    if not isinstance(instance, Task):
        raise TaskError(f"register_task expects a Task, got {type(instance).__name__}")
    key = name or instance.name
    if not key:
        raise TaskError(f"{type(instance).__name__} has no name; set `name` or pass name=...")
    if key in TASKS and not overwrite:
        raise TaskError(f"task {key!r} is already registered; pass overwrite=True to replace it")
    instance.name = key  # problems carry the name they are registered under
    TASKS[key] = instance
    return task


def get_task(name: str) -> Task:
    """The registered task called `name`; the error lists the valid names."""
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(
            f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS)) or '(none)'}"
        ) from None


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(TASKS)
