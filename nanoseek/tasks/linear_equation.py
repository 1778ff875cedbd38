"""Linear equations in one unknown with an integer solution; four levels.

Level 1: x + b = d.   Level 2: a x = d.   Level 3: a x + b = d.   Level 4: a x + b = c x + d.

Where arithmetic practises the carrying algorithms, this practises a different habit the RL stage
rewards: transforming a statement step by step while keeping it true ("subtract 7 from both
sides"). The solution x is drawn first and the right-hand side computed from it, so every equation
has exactly one integer solution and every line of the worked solution is exact.
"""

from __future__ import annotations

import random
import re

from nanoseek.tasks.base import Problem, Task, register_task
from nanoseek.tasks.extract import parse_number

# "x = 5", "x=5", "X = 5" -> "5"; the answer may name the unknown
_X_PREFIX = re.compile(r"^\s*x\s*=\s*", re.IGNORECASE)


def _term(a: int) -> str:
    """The x-term with coefficient a: x, -x, 3x, -3x."""
    return {1: "x", -1: "-x"}.get(a, f"{a}x")


def _side(a: int, b: int) -> str:
    """a x + b written the way people write it ("3x - 7", "x", "5")."""
    if a == 0:
        return str(b)
    if b == 0:
        return _term(a)
    return f"{_term(a)} {'+' if b > 0 else '-'} {abs(b)}"


def _div(num: int, den: int) -> str:
    return f"{num} / ({den})" if den < 0 else f"{num} / {den}"


def solution_steps(a: int, b: int, c: int, d: int) -> tuple[int, str]:
    """Solve a x + b = c x + d (a != c) step by step; returns (x, worked solution)."""
    lines = [f"{_side(a, b)} = {_side(c, d)}."]
    if c != 0:
        verb = f"Subtract {_term(c)} from" if c > 0 else f"Add {_term(-c)} to"
        a -= c
        lines.append(f"{verb} both sides: {_side(a, b)} = {d}.")
    if b != 0:
        verb, sign = (f"Subtract {b} from", "-") if b > 0 else (f"Add {-b} to", "+")
        lines.append(f"{verb} both sides: {_term(a)} = {d} {sign} {abs(b)} = {d - b}.")
        d -= b
    assert d % a == 0, "the generator picks d so that x is an integer"
    x = d // a
    if a == -1:
        lines.append(f"Multiply both sides by -1: x = {x}.")
    elif a != 1:
        lines.append(f"Divide both sides by {a}: x = {_div(d, a)} = {x}.")
    lines.append(f"So x = {x}.")
    return x, "\n".join(lines)


def _coef(rng: random.Random, lo: int, hi: int) -> int:
    """A nonzero coefficient of random sign with |value| in [lo, hi]."""
    return rng.randint(lo, hi) * rng.choice((1, -1))


class LinearEquationTask(Task):
    """Solve for x; the answer is the integer x ("x = 5" is accepted too)."""

    name = "linear_equation"
    levels = (1, 2, 3, 4)
    description = "solve a linear equation in x with an integer solution"

    def sample(self, rng: random.Random, level: int) -> Problem:
        if level == 1:
            x, a, b, c = rng.randint(0, 20), 1, _coef(rng, 1, 20), 0
        elif level == 2:
            x, a, b, c = rng.randint(-12, 12), _coef(rng, 2, 12), 0, 0
        elif level == 3:
            x, a, b, c = rng.randint(-20, 20), _coef(rng, 2, 12), _coef(rng, 1, 30), 0
        else:
            x, a, b, c = rng.randint(-20, 20), _coef(rng, 1, 12), _coef(rng, 1, 30), 0
            while c in (0, a):
                c = _coef(rng, 1, 12)
        d = a * x + b - c * x  # chosen so that x solves a x + b = c x + d
        solved, solution = solution_steps(a, b, c, d)
        assert solved == x
        return self.make_problem(
            key=f"linear:{a},{b},{c},{d}",
            question=f"Solve for x: {_side(a, b)} = {_side(c, d)}.",
            answer=str(x),
            solution=solution,
            level=level,
            coefficients=[a, b, c, d],
        )

    def check(self, problem: Problem, answer: str) -> bool:
        value = parse_number(_X_PREFIX.sub("", answer, count=1))
        return value is not None and value == int(problem.answer)


register_task(LinearEquationTask())
