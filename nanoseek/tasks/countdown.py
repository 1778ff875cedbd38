"""Countdown: reach a target from given numbers with + - * /, each number at most once.

The task of TinyZero and Mini-R1. The generator builds the target from a random
expression over all the numbers, so every problem is solvable; intermediate results stay positive
integers, as in the game show. The worked solution is a small search: a few full attempts that
miss (each computed exactly, so nothing false is taught), then the construction step by step.

The verifier is the security boundary for model output: a character whitelist, `parse_safe`
(an `ast` whitelist, never `eval`), a multiset check on the literals, and exact `Fraction`
arithmetic, so `(8/3)*3` counts as 8 and `1/0` is simply wrong.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from nanoseek.tasks.base import Problem, Task, register_task
from nanoseek.tasks.extract import parse_number
from nanoseek.tasks.safe_eval import SafeEvalError, evaluate, integer_literals, parse_safe

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
# integer division is exact here: _valid_ops only offers "/" when it divides evenly
_APPLY = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b,
}
MIN_TARGET, MAX_TARGET = 10, 999
MAX_INTERMEDIATE = 10_000  # keeps products (and the worked solution's numbers) small


@dataclass(frozen=True)
class _Node:
    value: int
    text: str
    prec: int  # 3 for a bare number: never needs parentheses


def _combine(a: _Node, op: str, b: _Node) -> _Node:
    """`a op b`, parenthesising children only where precedence or (non-)associativity needs it."""
    p = _PREC[op]
    left = a.text if a.prec >= p else f"({a.text})"
    # a - (b + c) and a / (b * c) need brackets on the right even at equal precedence
    right = b.text if b.prec > p or (b.prec == p and op in "+*") else f"({b.text})"
    return _Node(_APPLY[op](a.value, b.value), f"{left} {op} {right}", p)


def _valid_ops(a: int, b: int) -> list[str]:
    """Operations that keep the result a positive integer no larger than MAX_INTERMEDIATE."""
    ops = ["+"] if a + b <= MAX_INTERMEDIATE else []
    if a > b:
        ops.append("-")
    if a * b <= MAX_INTERMEDIATE and a > 1 and b > 1:  # x * 1 teaches nothing
        ops.append("*")
    if b > 1 and a % b == 0:
        ops.append("/")
    return ops


def _build(rng: random.Random, numbers: list[int]) -> tuple[_Node, list[str]] | None:
    """Combine random pairs until one value is left; returns the tree and its steps."""
    pool = [_Node(n, str(n), 3) for n in numbers]
    steps = []
    while len(pool) > 1:
        a, b = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
        ops = _valid_ops(a.value, b.value)
        if not ops:  # a <= b, both large: b - a is still fine, so swap roles (else give up)
            a, b = b, a
            ops = _valid_ops(a.value, b.value)
            if not ops:
                return None
        op = rng.choice(ops)
        node = _combine(a, op, b)
        steps.append(f"{a.value} {op} {b.value} = {node.value}")
        pool.append(node)
    return pool[0], steps


def _attempt(rng: random.Random, numbers: list[int], target: int) -> str | None:
    """A left-to-right chain over a random order of the numbers: one plausible miss, or None.

    The chain is abandoned once it passes 5x the target (a search prunes there too), which also
    keeps the document short.
    """
    order = rng.sample(numbers, len(numbers))
    value, steps = order[0], []
    for n in order[1:]:
        ops = _valid_ops(value, n)
        if not ops:
            return None
        op = rng.choice(ops)
        new = _APPLY[op](value, n)
        steps.append(f"{value} {op} {n} = {new}")
        value = new
        if value > 5 * target:
            return f"Try {', '.join(steps)}. Too big."
    return None if value == target else f"Try {', '.join(steps)}. Not {target}."


class CountdownTask(Task):
    """Level = how many numbers are given (2-6); numbers in 1..max_number; target in 10..999."""

    name = "countdown"
    levels = (2, 3, 4, 5, 6)
    description = "reach the target with + - * / using each given number at most once"

    def __init__(self, max_number: int = 50, max_attempts: int = 2) -> None:
        self.max_number = max_number
        self.max_attempts = max_attempts

    def sample(self, rng: random.Random, level: int) -> Problem | None:
        numbers = [rng.randint(1, self.max_number) for _ in range(level)]
        built = _build(rng, numbers)
        if built is None:
            return None
        node, steps = built
        target = node.value
        if not MIN_TARGET <= target <= MAX_TARGET or target in numbers:  # no one-number answers
            return None
        shown = ", ".join(map(str, numbers))
        lines = []
        for _ in range(rng.randint(0, self.max_attempts)):
            tried = _attempt(rng, numbers, target)
            if tried is not None and tried not in lines:
                lines.append(tried)
        lines.append(f"Try {', '.join(steps)}. That is {target}.")
        lines.append(f"So {node.text} = {target}.")
        return self.make_problem(
            key=f"countdown:{','.join(map(str, sorted(numbers)))}->{target}",
            question=(
                f"Using the numbers [{shown}], create an equation that equals {target}. "
                "You can use + - * / and each number at most once."
            ),
            answer=node.text,
            solution="\n".join(lines),
            level=level,
            numbers=numbers,
            target=target,
        )

    def check(self, problem: Problem, answer: str) -> bool:
        """Only given numbers (as a multiset), only + - * / ( ), exactly equal to the target."""
        numbers, target = problem.metadata["numbers"], problem.metadata["target"]
        expr = answer
        if "=" in expr:  # allow "expr = target", the way people (and models) write equations
            expr, _, rhs = expr.rpartition("=")
            if parse_number(rhs) != target:
                return False
        try:
            tree = parse_safe(expr, allow_decimals=False)
            used = integer_literals(tree)
            if not used or Counter(used) - Counter(numbers):
                return False
            return evaluate(tree) == target
        except SafeEvalError:
            return False


register_task(CountdownTask())
