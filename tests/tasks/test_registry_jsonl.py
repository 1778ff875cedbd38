import json
import random

import pytest

from nanoseek.tasks import (
    TASKS,
    JsonlTask,
    Problem,
    Task,
    TaskError,
    get_task,
    list_tasks,
    load_jsonl,
    register_task,
)


@pytest.fixture
def restore_registry():
    saved = dict(TASKS)
    yield
    TASKS.clear()
    TASKS.update(saved)


def test_unknown_task_lists_valid_names():
    with pytest.raises(TaskError) as err:
        get_task("multiplcation")
    msg = str(err.value)
    assert "multiplcation" in msg
    for name in ("arithmetic", "countdown", "linear_equation", "multiplication"):
        assert name in msg


def test_register_decorator_and_instance(restore_registry):
    @register_task
    class Parity(Task):
        name = "parity"
        levels = (1, 2)

        def sample(self, rng: random.Random, level: int) -> Problem:
            n = rng.randint(0, 10 ** (level * 3))
            return self.make_problem(
                f"parity:{n}", f"Is {n} even?", "yes" if n % 2 == 0 else "no", "", level
            )

    assert isinstance(get_task("parity"), Parity)
    problems = get_task("parity").generate(20, "test", seed=0)
    assert all(p.split == "test" and p.task == "parity" for p in problems)
    assert get_task("parity").verify(
        problems[0], f"<answer> {problems[0].answer.upper()} </answer>"
    )
    assert "parity" in list_tasks()

    with pytest.raises(TaskError, match="already registered"):
        register_task(Parity())
    register_task(Parity(), name="parity2")
    assert get_task("parity2").generate(1)[0].task == "parity2"
    register_task(Parity(), name="parity", overwrite=True)

    with pytest.raises(TaskError, match="expects a Task"):
        register_task(object())


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_task_round_trip(tmp_path, restore_registry):
    rows = [
        {"question": f"What is {i} squared?", "answer": i * i, "level": 1 + i % 2}
        for i in range(200)
    ]
    rows[0]["solution"] = "0 times 0 is 0. So the answer is 0."
    rows[1] = {"prompt": "Capital of France?", "answer": "Paris", "metadata": {"src": "x"}}
    path = write(tmp_path / "sq.jsonl", [json.dumps(r) for r in rows] + [""])
    problems = load_jsonl(path, task="squares")
    assert len(problems) == 200
    assert problems[0].solution.startswith("0 times 0")
    assert problems[2].answer == "4" and problems[2].level == 1
    assert problems[1].metadata == {"src": "x"}

    task = register_task(JsonlTask("squares", path))
    train = task.generate(300, "train", seed=0)
    test = task.generate(5, "test", seed=0)
    assert {p.question for p in train}.isdisjoint({p.question for p in test})
    assert train == task.generate(300, "train", seed=0)
    n_test = sum(p.split == "test" for p in problems)
    assert len(task.generate(n_test, "test", unique=True)) == n_test
    with pytest.raises(TaskError, match="unique"):
        task.generate(n_test + 1, "test", unique=True)
    p = next(q for q in problems if q.answer == "144")
    assert task.verify(p, "144") and task.verify(p, "<answer>144.0</answer>")
    assert not task.verify(p, "145")
    assert task.verify(problems[1], "  paris ")
    assert get_task("squares").levels == (1, 2)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"answer": "1"}', "missing or empty 'question'"),
        ('{"question": "q"}', "'answer' must be"),
        ('{"question": "q", "answer": ""}', "empty 'answer'"),
        ('{"question": "q", "answer": true}', "'answer' must be"),
        ('{"question": "q", "answer": "1", "level": "hard"}', "'level' must be an integer"),
        ('{"question": "q", "answer": "1", "metadata": [1]}', "'metadata' must be an object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    path = write(tmp_path / "bad.jsonl", ['{"question": "q1", "answer": "1"}', "", bad_line])
    with pytest.raises(TaskError) as err:
        load_jsonl(path)
    assert f"{path}:3:" in str(err.value)
    assert message in str(err.value)


def test_jsonl_missing_or_empty_file(tmp_path):
    with pytest.raises(TaskError, match="cannot open"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(TaskError, match="no problems"):
        load_jsonl(write(tmp_path / "empty.jsonl", ["", "  "]))
