"""Rule-based rewards for R1-style RL: plain functions `(problem, completion) -> float`.

R1-Zero uses no neural reward model, only rules [R1 §2.2.2]: an accuracy reward (the final
answer checked by the task's verifier) and a format reward (reasoning in `<think>...</think>`,
then the answer in `<answer>...</answer>`). R1's second stage adds a language-consistency reward
(the share of target-language words in the CoT) because RL alone drifts into mixed-language,
hard-to-read reasoning. All built-in rewards lie in [0, 1].

    from nanoseek.tasks.rewards import score, register_reward
    s = score(["accuracy", "format"], [1.0, 0.1], problem, completion)
    s.total, s.values, s.errors

A reward sees the completion only, i.e. the text the model wrote after the prompt. When the prompt
was prefilled with `<think>` (our chat template and `format_prompt` both do), the completion
starts inside the think block; rewards accept both that and a completion that opens `<think>`
itself.

Adding a reward: `register_reward("short", lambda p, c: float(len(c) < 500))`. A reward that
raises (or returns NaN/inf, or not a number) does not stop training: `score` gives it 0, records
the error, and `RewardStats` counts errors per reward so a run can report them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from nanoseek.tasks.base import TASKS, Problem
from nanoseek.tasks.extract import (
    ANSWER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    answers_match,
    check_format,
    extract_answer,
)

RewardFn = Callable[[Problem, str], float]


# ------------------------------------------------------------------------------ the rewards
def accuracy_reward(problem: Problem, completion: str) -> float:
    """1.0 if the answer inside `<answer>` (or `\\boxed{}`) is correct, else 0.0.

    Uses the registered task's strict verifier (`Task.verify_completion`: no last-number
    fallback, so an answer the model never committed to earns nothing). A problem whose task is
    not registered (e.g. an unregistered `JsonlTask`) is compared with `answers_match`.
    """
    task = TASKS.get(problem.task)
    if task is not None:
        return float(task.verify_completion(problem, completion))
    return float(answers_match(problem.answer, extract_answer(completion, fallback="none")))


def make_format_reward(prefilled: bool | None = None) -> RewardFn:
    """A format reward: 1.0 for `[<think>] reasoning </think> <answer> answer </answer>`.

    prefilled=True: the prompt ended in `<think>`, so the completion must not open another one.
    prefilled=False: the completion must open `<think>` itself. None (the registered "format"):
    either is accepted, so the reward is right whatever the template did - the classic "format
    reward stuck at 0" is a prefill mismatch between template and check.
    """

    def format_reward(problem: Problem, completion: str) -> float:
        if prefilled is None:
            opened = completion.lstrip().startswith(THINK_OPEN)
            return float(check_format(completion, prefilled=not opened))
        return float(check_format(completion, prefilled=prefilled))

    return format_reward


format_reward = make_format_reward(None)


def thinking(completion: str) -> str:
    """The chain of thought: the text before `</think>` (without a leading `<think>`). A
    completion that never closes the block is all reasoning up to an `<answer>`, if any."""
    text = completion.lstrip()
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN) :]
    end = text.find(THINK_CLOSE)
    if end < 0:
        end = text.find(ANSWER_OPEN)
    return text if end < 0 else text[:end]


# A "word" is a maximal run of letters (Unicode letters: no digits, underscores or symbols), so
# "12 + 7 = 19" has no words and "carry1" is the word "carry". A word belongs to the target
# language when every letter of it is in the language's alphabet. Add an entry for yours.
LANGUAGE_ALPHABETS: dict[str, str] = {
    "en": "A-Za-z",  # ASCII letters: "naïve" or "größer" count as not-English
    "latin": "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f",  # + Latin-1/Extended-A/B letters
    "zh": "\u3400-\u4dbf\u4e00-\u9fff",  # CJK ideographs: a run of them is one "word"
    "ru": "\u0400-\u04ff",  # Cyrillic
}
_WORD = re.compile(r"[^\W\d_]+")


def language_share(text: str, language: str = "en") -> float | None:
    """Share of the words of `text` written in `language`'s alphabet; None if it has no words."""
    try:
        target = re.compile(f"[{LANGUAGE_ALPHABETS[language]}]+")
    except KeyError:
        raise ValueError(
            f"unknown language {language!r}; known: {', '.join(LANGUAGE_ALPHABETS)}"
        ) from None
    words = _WORD.findall(text)
    if not words:
        return None
    return sum(1 for w in words if target.fullmatch(w)) / len(words)


def make_language_reward(language: str = "en") -> RewardFn:
    """R1 stage 2's language-consistency reward [R1 §2.3.2]: the share of the CoT's words in the
    target language. An empty CoT scores 0 (nothing readable); a CoT of numbers and symbols only
    (no words at all) scores 1 (nothing in another language)."""
    language_share("", language)  # fail now on an unknown language, not at the first rollout

    def language_reward(problem: Problem, completion: str) -> float:
        cot = thinking(completion)
        if not cot.strip():
            return 0.0
        share = language_share(cot, language)
        return 1.0 if share is None else share

    return language_reward


MAX_LINE_CHARS = 300  # a longer CoT line is almost always a degenerate run-on, not reasoning


def readability_reward(problem: Problem, completion: str) -> float:
    """Share of the CoT's non-empty lines that are well formed: at most MAX_LINE_CHARS long and
    not a repeat of an earlier line. Repetition loops are how small models usually become
    unreadable under RL; a CoT with no lines scores 0."""
    lines = [ln.strip() for ln in thinking(completion).splitlines() if ln.strip()]
    if not lines:
        return 0.0
    seen: set[str] = set()
    good = 0
    for ln in lines:
        good += ln not in seen and len(ln) <= MAX_LINE_CHARS
        seen.add(ln)
    return good / len(lines)


# ------------------------------------------------------------------------------ the registry
REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "format_prefilled": make_format_reward(True),
    "language": make_language_reward("en"),
    "readability": readability_reward,
}


def register_reward(name: str, fn: RewardFn, *, overwrite: bool = False) -> RewardFn:
    """Add `fn(problem, completion) -> float` under `name`; returns `fn`."""
    if not callable(fn):
        raise ValueError(f"reward {name!r} must be callable, got {type(fn).__name__}")
    if name in REWARDS and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True")
    REWARDS[name] = fn
    return fn


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(
            f"unknown reward {name!r}; valid rewards: {', '.join(sorted(REWARDS))}"
        ) from None


def _name(reward: str | RewardFn) -> str:
    return reward if isinstance(reward, str) else getattr(reward, "__name__", repr(reward))


# ------------------------------------------------------------------------------ scoring
@dataclass
class Score:
    total: float  # sum of weight * value over the rewards that worked
    values: dict[str, float]  # reward name -> value (0.0 for one that failed)
    errors: dict[str, str] = field(default_factory=dict)  # reward name -> "TypeError: ..."


def score(
    rewards: Sequence[str | RewardFn],
    weights: Sequence[float] | None,
    problem: Problem,
    completion: str,
) -> Score:
    """Weighted sum of `rewards` (names or functions) for one completion.

    A reward that raises, or returns something that is not a finite number, counts as 0 and is
    recorded in `Score.errors`; the others still count. Unknown reward names and a wrong number
    of weights are user errors and raise at once.
    """
    fns = [get_reward(r) if isinstance(r, str) else r for r in rewards]
    weights = [1.0] * len(fns) if weights is None else list(weights)
    if len(weights) != len(fns):
        raise ValueError(f"{len(fns)} rewards but {len(weights)} weights")
    total, values, errors = 0.0, {}, {}
    for i, (reward, fn, w) in enumerate(zip(rewards, fns, weights)):
        name = _name(reward)
        if name in values:  # two lambdas, or one reward listed twice: keep both apart
            name = f"{name}#{i}"
        try:
            value = fn(problem, completion)
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"returned {value!r}, not a finite number")
            value = float(value)
        except Exception as err:  # noqa: BLE001 - one broken reward must not stop a run
            errors[name] = f"{type(err).__name__}: {err}"
            value = 0.0
        values[name] = value
        total += w * value
    return Score(total, values, errors)


@dataclass
class RewardStats:
    """Running error counts (and the first message) per reward, plus the number of scores."""

    n_scored: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)

    def add(self, s: Score) -> Score:
        self.n_scored += 1
        for name, msg in s.errors.items():
            self.errors[name] = self.errors.get(name, 0) + 1
            self.first_error.setdefault(name, msg)
        return s

    def report(self) -> list[str]:
        """One line per failing reward, e.g. for warnings or a run summary."""
        return [
            f"reward {name!r} failed on {n} of {self.n_scored} completions "
            f"(counted as 0); first error: {self.first_error[name]}"
            for name, n in sorted(self.errors.items())
        ]


def score_batch(
    rewards: Sequence[str | RewardFn],
    weights: Sequence[float] | None,
    problems: Sequence[Problem],
    completions: Sequence[str],
    stats: RewardStats | None = None,
) -> tuple[list[float], dict[str, float]]:
    """Totals for pairs of (problem, completion), and each reward's mean over the batch
    (`reward/<name>`, as TRL logs them) plus `reward_errors`, the failed calls in this batch."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    scores = [score(rewards, weights, p, c) for p, c in zip(problems, completions)]
    if stats is not None:
        for s in scores:
            stats.add(s)
    means: dict[str, float] = {}
    for s in scores:
        for name, v in s.values.items():
            means[f"reward/{name}"] = means.get(f"reward/{name}", 0.0) + v / max(len(scores), 1)
    means["reward_errors"] = float(sum(len(s.errors) for s in scores))
    return [s.total for s in scores], means


def rewards_from_spec(spec: Mapping[str, float] | Sequence[str]) -> tuple[list[str], list[float]]:
    """`{"accuracy": 1, "format": 0.1}` or `["accuracy", "format"]` -> (names, weights), checked."""
    if isinstance(spec, Mapping):
        names, weights = list(spec), [float(w) for w in spec.values()]
    else:
        names, weights = list(spec), [1.0] * len(spec)
    for n in names:
        get_reward(n)
    return names, weights
