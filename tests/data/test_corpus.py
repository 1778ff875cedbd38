import json
from collections import Counter

import pytest

from nanoseek.data.corpus import DOC_SEPARATOR, generate_corpus, write_corpus
from nanoseek.tasks import TaskError, get_task, split_of
from nanoseek.tasks.templates import format_document


def test_deterministic_by_seed():
    a = list(generate_corpus(300, seed=5))
    assert a == list(generate_corpus(300, seed=5))
    assert a[:100] == list(generate_corpus(100, seed=5))
    assert a != list(generate_corpus(300, seed=6))


def test_mixes_the_tasks_in_r1_zero_format():
    docs = list(generate_corpus(600, seed=0))
    kinds = Counter(
        "countdown" if "Using the numbers" in d else "linear" if "Solve for x" in d else "arith"
        for d in docs
    )
    assert all(150 < kinds[k] < 250 for k in ("countdown", "linear", "arith")), kinds
    for d in docs:
        assert d.startswith("User: ") and "\nAssistant: <think>" in d
        assert d.count("</think> <answer>") == 1 and d.endswith("</answer>")
        assert DOC_SEPARATOR not in d
        assert 50 < len(d) < 700  # a few hundred characters: whole documents in a 512 context


def test_documents_teach_only_correct_answers():
    names = ("arithmetic", "countdown", "linear_equation")
    # rebuild the documents from the same streams and check each answer against its task
    docs = list(generate_corpus(400, seed=1, tasks=names, levels=(1, 2, 3)))
    by_text = {}
    for name in names:
        task = get_task(name)
        for level in (1, 2, 3):
            if level in task.levels:
                for p in task.generate(400, "train", seed=1, level=level):
                    by_text[format_document(p, "short")] = (task, p)
    for d in docs:
        task, p = by_text[d]  # every document is a train problem of the named tasks and levels
        assert p.level in (1, 2, 3)
        assert task.verify_completion(p, d)


def test_held_out_problems_never_in_the_corpus():
    docs = set(generate_corpus(3000, seed=0, tasks=("addition",), levels=(1, 2)))
    task = get_task("addition")
    held_out = [p for lvl in (1, 2) for p in task.generate(200, "test", seed=0, level=lvl)]
    assert all(p.split == "test" for p in held_out)
    for p in held_out:
        assert format_document(p, "short") not in docs
        assert f"User: {p.question}\n" not in "".join(docs)
    # and every question in the corpus hashes to train
    for d in list(docs)[:500]:
        a, b = d.split("What is ")[1].split("?")[0].split(" + ")
        key = f"+:{min(int(a), int(b))},{max(int(a), int(b))}"
        assert split_of(key) == "train"


def test_test_split_corpus_for_validation():
    docs = list(generate_corpus(50, seed=0, tasks=("countdown",), split="test"))
    assert len(docs) == 50
    assert not set(docs) & set(generate_corpus(2000, seed=0, tasks=("countdown",)))


def test_levels_options():
    docs = list(generate_corpus(200, seed=0, tasks=("multiplication",), levels=(1,)))
    assert all("Multiply" not in d for d in docs)  # 1-digit products need no partial products
    docs = list(generate_corpus(50, seed=0, tasks=("countdown",), levels={"countdown": [2]}))
    assert all(d.count(",") >= 1 and "Using the numbers [" in d for d in docs)
    with pytest.raises(TaskError, match="no valid level for task 'countdown'"):
        generate_corpus(10, tasks=("countdown",), levels=(1,))
    with pytest.raises(TaskError, match="unknown task 'nope'; valid tasks: "):
        generate_corpus(10, tasks=("nope",))
    with pytest.raises(TaskError, match="valid templates"):
        generate_corpus(10, template="chatml")
    with pytest.raises(TaskError, match="split"):
        generate_corpus(10, split="val")
    full = next(generate_corpus(1, seed=0, template="r1zero"))
    assert full.startswith("A conversation between User and Assistant.")
    assert next(generate_corpus(1, seed=0, tasks="countdown")).startswith("User: Using")


def test_write_jsonl_and_text(tmp_path):
    docs = list(generate_corpus(40, seed=2))
    assert write_corpus(tmp_path / "c.jsonl", 40, seed=2) == 40
    lines = (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == docs

    assert write_corpus(tmp_path / "c.txt", 40, seed=2) == 40
    assert (tmp_path / "c.txt").read_text(encoding="utf-8").split(DOC_SEPARATOR) == docs
    assert not list(tmp_path.glob("*.tmp"))


def test_write_failure_leaves_no_file(tmp_path):
    with pytest.raises(TaskError):
        write_corpus(tmp_path / "c.jsonl", 10, tasks=("nope",))
    assert list(tmp_path.iterdir()) == []
