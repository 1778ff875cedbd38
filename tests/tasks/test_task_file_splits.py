"""Task files keep their own split: whole-file training and test sets, rows' "split" fields,
draws in epochs without replacement; generated tasks keep their hash split and draws."""

import json
from collections import Counter

import pytest

from nanoseek.tasks import JsonlTask, TaskError, get_task, is_task_file, resolve_task
from nanoseek.tasks.resolve import draws, same_file


def write_task(path, n, splits=None):
    """n problems "What is i squared?"; splits[i] (when given and not None) is row i's "split"."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {"question": f"What is {i} squared?", "answer": str(i * i)}
            if splits is not None and splits[i] is not None:
                row["split"] = splits[i]
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_a_file_given_as_one_split_is_all_of_it(tmp_path):
    path = write_task(tmp_path / "sq.jsonl", 20)
    train = resolve_task(path, split="train")
    test = resolve_task(path, split="test")
    assert train.count("train") == 20 and train.count("test") == 0
    assert test.count("test") == 20 and test.count("train") == 0
    assert {p.id for p in test.generate(20, "test", unique=True)} == {p.id for p in test.problems}
    with pytest.raises(TaskError, match="given as a train set"):
        train.generate(1, "test")


def test_the_default_keeps_the_hash_split(tmp_path):
    path = write_task(tmp_path / "sq.jsonl", 200)
    hashed = resolve_task(path)  # a file that one run both trains and evaluates on
    n_test = hashed.count("test")
    assert 0 < n_test < 60 and hashed.count("train") == 200 - n_test
    assert all(p.split == "test" for p in hashed.generate(n_test, "test", unique=True))


def test_rows_split_fields_rule_whatever_the_file_is_given_as(tmp_path):
    splits = ["test" if i % 4 == 0 else "train" if i % 4 == 1 else None for i in range(20)]
    path = write_task(tmp_path / "mixed.jsonl", 20, splits)
    for given, n_train in (("train", 15), ("test", 5)):
        t = JsonlTask("mixed", path, split=given)
        assert t.count("train") == n_train and t.count("test") == 20 - n_train
        pinned = {p.question: p.split for p in t.problems}
        assert all(pinned[f"What is {i} squared?"] == s for i, s in enumerate(splits) if s)
    hashed = JsonlTask("mixed", path)
    assert {p.question for p in hashed.problems if p.split == "test"} >= {
        f"What is {i} squared?" for i in range(0, 20, 4)
    }


def test_a_bad_split_field_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "r", "answer": "2", '
                    '"split": "validation"}\n')  # fmt: skip
    with pytest.raises(TaskError, match=r"bad.jsonl:2: 'split' must be \"train\" or \"test\""):
        JsonlTask("bad", path)
    with pytest.raises(TaskError, match="split must be one of"):
        JsonlTask("bad", write_task(tmp_path / "ok.jsonl", 3), split="dev")


def test_draws_go_in_epochs_without_replacement(tmp_path):
    task = resolve_task(write_task(tmp_path / "sq.jsonl", 20), split="train")
    drawn = task.generate(60, "train", seed=3)
    for epoch in range(3):  # each block of 20 is one permutation of the file
        assert Counter(p.id for p in drawn[20 * epoch : 20 * (epoch + 1)]) == Counter(
            p.id for p in task.problems
        )
    assert drawn[:20] != drawn[20:40]  # a fresh permutation each epoch
    # the first epoch is the unique order, so a unique prefix extends into epochs
    assert drawn[:20] == task.generate(20, "train", seed=3, unique=True)
    assert task.generate(60, "train", seed=3) == drawn  # deterministic in the seed
    assert draws(task, None) == 20 and draws(task, 7) == 7
    assert draws(get_task("addition"), None) == 1000


def test_resolve_task_names_and_files(tmp_path):
    assert resolve_task("addition") is get_task("addition")
    assert resolve_task("addition", split="test") is get_task("addition")  # generated: ignored
    with pytest.raises(TaskError, match="no such task file"):
        resolve_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        resolve_task("nope")
    a = write_task(tmp_path / "a.jsonl", 3)
    assert same_file(a, str(tmp_path / "." / "a.jsonl")) and not same_file(a, "addition")
    # the old import path keeps working for callers of the trainers' module
    from nanoseek.train.sft_data import resolve_task as old

    assert old is resolve_task


def test_is_task_file(tmp_path):
    assert is_task_file(write_task(tmp_path / "t.jsonl", 2))
    chat = tmp_path / "c.jsonl"
    chat.write_text('{"prompt": "q", "completion": "a"}\n')
    text = tmp_path / "d.jsonl"
    text.write_text('{"text": "a document", "answer": "x", "question": "y"}\n')
    assert not is_task_file(chat) and not is_task_file(text)
    assert not is_task_file(tmp_path / "none.jsonl")


# ids drawn before task files got their own split: generated tasks must not move
PINNED = {
    "addition": (["addition-145732b8ab79", "addition-7f34b51fb9bc", "addition-6e7d1eb7f4d3"],
                 ["addition-32a904a76632", "addition-41537ca85830"]),
    "countdown": (["countdown-0a6965c4a9e7", "countdown-85a896336639", "countdown-1ee47edc2997"],
                  ["countdown-962bcb7c36bf", "countdown-8e745a697483"]),
    "linear_equation": (["linear_equation-a99d752d0eb8", "linear_equation-af5b23a2eddd",
                         "linear_equation-855c651b673f"],
                        ["linear_equation-7bd3e54b3d30", "linear_equation-aeb4575a252b"]),
    "arithmetic": (["arithmetic-9801822335c0", "arithmetic-3cdd16d330a1",
                    "arithmetic-480d272278c3"],
                   ["arithmetic-a9510a6382d2", "arithmetic-c436fa4d8513"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PINNED))
def test_generated_tasks_draw_the_same_problems_as_before(name):
    train_ids, test_ids = PINNED[name]
    task = get_task(name)
    assert [p.id for p in task.generate(3, "train", seed=0)] == train_ids
    assert [p.id for p in task.generate(2, "test", seed=1)] == test_ids
    assert task.count("test") is None
    assert all(p.pinned_split is None for p in task.generate(5, "train"))
