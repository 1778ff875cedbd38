"""Multi-digit addition, subtraction and multiplication; level = digits per operand.

Multiplication is the other task R1-Zero reproductions use besides countdown. The
worked solutions spell out the school algorithm one small step per line (column by column with
carries and borrows; partial products, then a running sum), because a small model can learn a
multi-digit result only through such intermediate steps. Every line is a true statement and the
last line states the answer, so the pre-training corpus never teaches a wrong result.
"""

from __future__ import annotations

import random

from nanoseek.tasks.base import Problem, Task, register_task

OPS = ("+", "-", "*")
COMMUTATIVE = ("+", "*")


def _digits(x: int, width: int) -> list[int]:
    """Digits of x, least significant first, zero-padded to `width`."""
    return [int(c) for c in reversed(str(x).zfill(width))]


def addition_steps(a: int, b: int) -> str:
    """Column addition from the right with carries; a, b >= 0."""
    width = max(len(str(a)), len(str(b)))
    if width == 1:  # a single column: the steps would only repeat the result
        return f"So {a} + {b} = {a + b}."
    lines = [f"Add {a} + {b} column by column from the right."]
    carry = 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        s = x + y + carry
        terms = f"{x} + {y} + {carry}" if carry else f"{x} + {y}"
        carry = s // 10
        lines.append(f"{terms} = {s}, write {s % 10}" + (", carry 1." if carry else "."))
    if carry:
        lines.append("Write the last carry 1 in front.")
    lines.append(f"So {a} + {b} = {a + b}.")
    return "\n".join(lines)


def subtraction_steps(a: int, b: int) -> str:
    """Column subtraction from the right with borrows; a, b >= 0, any order."""
    lines = []
    big, small = (a, b) if a >= b else (b, a)
    if a < b:
        lines.append(f"{a} is less than {b}, so compute {b} - {a} and make it negative.")
    width = len(str(big))
    if width == 1:
        extra = [f"{b} - {a} = {b - a}."] if a < b else []
        return "\n".join([*lines, *extra, f"So {a} - {b} = {a - b}."])
    lines.append(f"Subtract {big} - {small} column by column from the right.")
    borrow = 0
    for x, y in zip(_digits(big, width), _digits(small, width)):
        head = f"{x} - 1 - {y}" if borrow else f"{x} - {y}"
        top = x - borrow
        if top < y:
            r = top + 10 - y
            lines.append(f"{head} is negative, borrow 10: {top + 10} - {y} = {r}, write {r}.")
            borrow = 1
        else:
            lines.append(f"{head} = {top - y}, write {top - y}.")
            borrow = 0
    assert borrow == 0, "big >= small, so the last column never borrows"
    if a < b:
        lines.append(f"{b} - {a} = {b - a}.")
    lines.append(f"So {a} - {b} = {a - b}.")
    return "\n".join(lines)


def multiplication_steps(a: int, b: int) -> str:
    """Partial products of `a` with each digit of `b` (shifted), then a running sum."""
    if b < 10:
        return f"So {a} * {b} = {a * b}."
    lines = [f"Multiply {a} by each digit of {b}, then add the partial products."]
    partials = []
    for i, d in enumerate(_digits(b, len(str(b)))):
        if d == 0:
            continue  # a zero digit adds nothing; skipping it keeps the document short
        p = a * d * 10**i
        partials.append(p)
        lines.append(f"{a} * {d * 10**i} = {p}")
    total = partials[0]
    for p in partials[1:]:
        lines.append(f"{total} + {p} = {total + p}")
        total += p
    assert total == a * b
    lines.append(f"So {a} * {b} = {a * b}.")
    return "\n".join(lines)


_STEPS = {"+": addition_steps, "-": subtraction_steps, "*": multiplication_steps}
_VALUE = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_key(op: str, a: int, b: int) -> str:
    """Canonical content: commutative operands sorted, so 17 + 25 and 25 + 17 share a split."""
    if op in COMMUTATIVE:
        a, b = sorted((a, b))
    return f"{op}:{a},{b}"


class ArithmeticTask(Task):
    """`a op b` with two `level`-digit operands; `ops` picks the operations to mix."""

    def __init__(
        self,
        name: str = "arithmetic",
        ops: tuple[str, ...] = OPS,
        max_level: int = 6,
        question: str = "What is {a} {op} {b}?",
    ) -> None:
        unknown = set(ops) - set(OPS)
        if not ops or unknown:
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops!r}")
        self.name = name
        self.ops = tuple(ops)
        self.levels = tuple(range(1, max_level + 1))
        self.question = question
        self.description = f"{'/'.join(self.ops)} of two multi-digit numbers; level = digits"

    def sample(self, rng: random.Random, level: int) -> Problem:
        low = 0 if level == 1 else 10 ** (level - 1)
        a, b = rng.randint(low, 10**level - 1), rng.randint(low, 10**level - 1)
        op = rng.choice(self.ops)
        return self.make_problem(
            key=arithmetic_key(op, a, b),
            question=self.question.format(a=a, op=op, b=b),
            answer=str(_VALUE[op](a, b)),
            solution=_STEPS[op](a, b),
            level=level,
            op=op,
            operands=[a, b],
        )


register_task(ArithmeticTask())
register_task(ArithmeticTask("addition", ("+",)))
register_task(ArithmeticTask("subtraction", ("-",)))
register_task(ArithmeticTask("multiplication", ("*",)))
# the sums of `addition` asked in other words (same problems, same split, same worked solutions):
# a second prompt distribution over one skill, so a corpus can teach the skill through one
# phrasing and a different habit (e.g. answering without working) through the other
register_task(ArithmeticTask("sum", ("+",), question="Find the sum of {a} and {b}."))
