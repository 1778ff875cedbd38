"""Properties every built-in task family must have: splits, determinism, correct solutions."""

import pytest

from nanoseek.tasks import TASKS, Problem, TaskError, get_task, split_of
from nanoseek.tasks.arithmetic import arithmetic_key
from nanoseek.tasks.templates import format_document

BUILTIN = (
    "arithmetic",
    "addition",
    "subtraction",
    "multiplication",
    "countdown",
    "linear_equation",
    "sum",
)


def test_builtins_registered():
    assert set(BUILTIN) <= set(TASKS)


@pytest.mark.parametrize("name", BUILTIN)
def test_splits_never_overlap(name):
    task = get_task(name)
    train = task.generate(3000, "train", seed=1)
    test = task.generate(1000, "test", seed=1)
    # another seed and another order of generation: the split of a key must not move
    train2 = task.generate(2000, "train", seed=2)
    test2 = task.generate(500, "test", seed=3)
    assert all(p.split == "train" for p in train + train2)
    assert all(p.split == "test" for p in test + test2)
    train_keys = {p.key for p in train + train2}
    test_keys = {p.key for p in test + test2}
    assert train_keys.isdisjoint(test_keys)
    assert {p.question for p in train + train2}.isdisjoint({p.question for p in test + test2})
    for p in train[:50] + test[:50]:
        assert split_of(p.key) == p.split


def test_split_is_shared_across_tasks_and_operand_order():
    # "addition" and "arithmetic" hold out the same sums, and 17 + 25 goes with 25 + 17
    assert arithmetic_key("+", 17, 25) == arithmetic_key("+", 25, 17)
    assert arithmetic_key("-", 17, 25) != arithmetic_key("-", 25, 17)
    held_out = {p.key for p in get_task("addition").generate(300, "test", seed=0, level=2)}
    train = {p.key for p in get_task("arithmetic").generate(3000, "train", seed=0, level=2)}
    assert held_out and held_out.isdisjoint(train)


def test_split_fraction_is_about_ten_percent():
    keys = [f"+:{a},{a + 7}" for a in range(20_000)]
    share = sum(split_of(k) == "test" for k in keys) / len(keys)
    assert 0.09 < share < 0.11


@pytest.mark.parametrize("name", BUILTIN)
def test_deterministic_by_seed(name):
    task = get_task(name)
    a = task.generate(50, "train", seed=7)
    assert a == task.generate(50, "train", seed=7)
    assert a[:20] == task.generate(20, "train", seed=7)  # a prefix, not a different draw
    assert a != task.generate(50, "train", seed=8)


def test_determinism_does_not_depend_on_hash_seed():
    # the same first problem as any other process gets (str hashing is salted per process)
    p = get_task("addition").generate(1, "train", seed=0, level=3)[0]
    assert p.to_dict() == get_task("addition").generate(1, "train", seed=0, level=3)[0].to_dict()
    assert p.id == f"addition-{p.id.split('-')[1]}" and len(p.id.split("-")[1]) == 12


@pytest.mark.parametrize("name", BUILTIN)
def test_every_worked_solution_ends_in_a_verified_answer(name):
    task = get_task(name)
    for level in task.levels:
        for split in ("train", "test"):
            for p in task.generate(150, split, seed=level, level=level):
                assert p.level == level and p.task == name
                assert task.verify(p, p.answer), p
                last = p.solution.splitlines()[-1]
                assert last.startswith("So ") and last.endswith(".")
                assert "\n\n" not in p.solution  # plain-text corpora separate documents by it
                doc = format_document(p)
                assert task.verify_completion(p, doc), doc


def test_arithmetic_solution_lines_are_true():
    # every chain "a op b [op c] = d" in a worked solution is true: the corpus teaches no errors
    import re

    from nanoseek.tasks.safe_eval import safe_eval

    eq = re.compile(r"(?<![\d-])((?:-?\d+ [-+*] )+-?\d+) = (-?\d+)")
    for name in ("addition", "subtraction", "multiplication", "linear_equation"):
        for p in get_task(name).generate(500, seed=0):
            found = eq.findall(p.solution)
            assert found or name == "linear_equation", p.solution
            for left, right in found:
                assert safe_eval(left) == int(right), (left, right, p.solution)


def test_sum_is_addition_in_other_words():
    import random

    add, total = get_task("addition"), get_task("sum")
    assert total.levels == add.levels
    splits = set()
    for level in add.levels:
        for i in range(200):
            a = add.sample(random.Random(f"{level}|{i}"), level)
            s = total.sample(random.Random(f"{level}|{i}"), level)  # the same operand draws
            x, y = s.metadata["operands"]
            assert a.metadata["operands"] == [x, y] and s.metadata["op"] == "+"
            assert s.question == f"Find the sum of {x} and {y}." != a.question
            assert a.question == f"What is {x} + {y}?"
            assert s.answer == a.answer == str(x + y)
            assert s.solution == a.solution
            assert s.key == a.key and s.split == a.split == split_of(s.key)
            assert s.level == level and s.task == "sum" and s.id.startswith("sum-")
            assert total.verify(s, s.answer) and total.verify(s, f"<answer>{x + y}</answer>")
            assert not total.verify(s, str(x + y + 1)) and not total.verify(s, s.question)
            assert total.verify_completion(s, format_document(s, "short"))
            splits.add(s.split)
    assert splits == {"train", "test"}
    # a sum held out for addition is held out for sum too, whichever task draws it
    held_out = {p.key for p in add.generate(300, "test", seed=0, level=2)}
    train = total.generate(3000, "train", seed=0, level=2)
    assert held_out and held_out.isdisjoint(p.key for p in train)
    assert all(p.question.startswith("Find the sum of ") for p in train)


def test_arithmetic_examples():
    task = get_task("subtraction")
    p = task.make_problem("-:3,8", "What is 3 - 8?", "-5", "", 1)
    for good in ("-5", " -5 ", "<answer>-5</answer>", "\u22125", "\\boxed{-5}", "-5.0", "-005"):
        assert task.verify(p, good), good
    for bad in (
        "5",
        "- 5 apples",
        "3 - 8",  # the question, not the answer
        "",
        "<answer>-5",
        "-5</answer>",
        "1,000",
        "__import__('os').system('ls')",
        "2**9999999",
        "-" + "5" * 100_000,
        "<answer>" * 10_000 + "-5",
    ):
        assert not task.verify(p, bad), bad
    big = task.make_problem("+:999,1", "What is 999 + 1?", "1000", "", 3)
    assert get_task("addition").verify(big, "1,000")
    assert get_task("addition").verify(big, "1000")
    assert not get_task("addition").verify(big, "1.000,0")


def test_linear_equation_answers():
    task = get_task("linear_equation")
    p = task.generate(1, seed=0, level=3)[0]
    x = p.answer
    for good in (x, f"x = {x}", f"x={x}", f"X = {x}", f"<answer>x = {x}</answer>"):
        assert task.verify(p, good), good
    assert not task.verify(p, f"y = {x}")
    assert not task.verify(p, str(int(x) + 1))
    assert not task.verify(p, f"x = {x} or x = 0")


def test_levels_and_splits_are_validated():
    task = get_task("arithmetic")
    with pytest.raises(TaskError, match="valid levels: 1, 2, 3, 4, 5, 6"):
        task.generate(1, level=99)
    with pytest.raises(TaskError, match="split"):
        task.generate(1, split="validation")
    with pytest.raises(TaskError, match="n must be"):
        task.generate(-1)
    assert task.generate(0) == []


def test_unique_generation_and_exhaustion():
    task = get_task("addition")
    problems = task.generate(300, "train", seed=0, level=2, unique=True)
    assert len({p.key for p in problems}) == 300
    # 1-digit sums: 55 unordered pairs, about a tenth of them held out -> runs dry, clearly
    with pytest.raises(TaskError, match="too small"):
        task.generate(100, "test", seed=0, level=1, unique=True)


def test_problem_round_trips_through_dict():
    p = get_task("countdown").generate(1, seed=0)[0]
    assert Problem.from_dict(p.to_dict()) == p
