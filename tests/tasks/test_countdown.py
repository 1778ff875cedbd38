from fractions import Fraction

import pytest

from nanoseek.tasks import get_task
from nanoseek.tasks.safe_eval import safe_eval

task = get_task("countdown")


def problem(numbers, target):
    return task.make_problem(
        f"countdown:{sorted(numbers)}->{target}",
        f"Using the numbers {numbers}, create an equation that equals {target}.",
        "",
        "",
        len(numbers),
        numbers=list(numbers),
        target=target,
    )


P = problem([75, 3, 8, 11], 99)


@pytest.mark.parametrize(
    "answer",
    [
        "(75 - 3) / 8 * 11",
        " (75-3)/8*11 ",
        "11 * (75 - 3) / 8",
        "(75 - 3) / 8 * 11 = 99",  # an equation whose right side is the target
        "<answer>(75 - 3) / 8 * 11</answer>",
        "<answer> x </answer><answer>11*(75-3)/8</answer>",  # the last tag counts
    ],
)
def test_accepts_correct_expressions(answer):
    assert task.verify(P, "  " + answer + " " * 2000)  # surrounding whitespace is free
    assert task.verify(P, answer)


@pytest.mark.parametrize(
    "answer",
    [
        "99",  # a number that is not given
        "75 + 3 + 8 + 11 + 2",  # 2 is not given
        "75 + 75 - 51",  # 75 used twice
        "(75 - 3) / 8 * 11 = 100",  # wrong right-hand side
        "75 + 3 + 8 + 11",  # 97: wrong value
        "(75 - 3) / 8 * 11 + 0",  # 0 is not given
        "(75 - 3) / (8 - 8) * 11",  # division by zero, and 8 twice
        "75 / (3 - 3)",
        "(75 - 3) // 8 * 11",
        "2**9999999",
        "__import__('os').system('rm -rf /')",
        "(75 - 3) / 8 * 11; print(1)",
        "75.0 + 24",
        "075 + 24",
        "",
        "<answer></answer>",
        "(" * 130 + "(75 - 3) / 8 * 11" + ")" * 130,  # right, but over the length limit
        "1" * 100_000,
    ],
)
def test_rejects(answer):
    assert not task.verify(P, answer)


def test_exact_fractions_and_subsets():
    p = problem([3, 3, 8, 8], 24)
    assert task.verify(p, "8 / (3 - 8 / 3)")  # needs the exact intermediate 1/3
    assert safe_eval("8 / (3 - 8 / 3)") == Fraction(24)
    assert task.verify(problem([2, 5, 7], 10), "2 * 5")  # numbers may be left unused
    assert task.verify(problem([2, 5, 7], 3), "-2 + 5")  # unary minus is allowed


def test_generated_problems_are_solvable_and_well_formed():
    for level in task.levels:
        for p in task.generate(200, "train", seed=level, level=level):
            numbers, target = p.metadata["numbers"], p.metadata["target"]
            assert len(numbers) == level and all(1 <= n <= task.max_number for n in numbers)
            assert 10 <= target <= 999 and target not in numbers
            assert task.verify(p, p.answer), p
            assert sorted(int(t) for t in _literals(p.answer)) == sorted(numbers)  # uses all
            assert f"[{', '.join(map(str, numbers))}]" in p.question
            assert str(target) in p.question


def test_search_trace_lines_are_true():
    # every step "a op b = c" of every attempt is true, including the misses
    import re

    eq = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
    for p in task.generate(300, seed=0):
        *trace, last = p.solution.splitlines()
        assert last == f"So {p.answer} = {p.metadata['target']}."
        assert trace and all(line.startswith("Try ") for line in trace)
        for line in trace:
            for a, op, b, c in eq.findall(line):
                assert safe_eval(f"{a} {op} {b}") == int(c), p.solution


def _literals(expr):
    import re

    return re.findall(r"\d+", expr)
