import json
import re
from collections import Counter

import pytest

from nanoseek.data.corpus import DOC_SEPARATOR, generate_corpus, write_corpus
from nanoseek.tasks import TaskError, get_task, split_of
from nanoseek.tasks.arithmetic import arithmetic_key
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


# ------------------------------------------------------------------------------ weights, direct
_QUESTION = re.compile(r"^User: (?:What is (\d+) \+ (\d+)\?|Find the sum of (\d+) and (\d+)\.)\n")


def _sum_doc(doc: str) -> tuple[str, int, int]:
    """(task, a, b) of an addition or sum document."""
    m = _QUESTION.match(doc)
    assert m, doc
    if m.group(1) is not None:
        return "addition", int(m.group(1)), int(m.group(2))
    return "sum", int(m.group(3)), int(m.group(4))


def _think(doc: str) -> str:
    return doc.split("<think>", 1)[1].split("</think>", 1)[0]


def _answer(doc: str) -> str:
    assert doc.endswith("</answer>"), doc
    return doc.rsplit("<answer>", 1)[1][: -len("</answer>")]


def test_level_weights_set_the_share_of_each_level():
    n = 4000
    weights = {1: 0.6, 2: 0.3, 3: 0.1, 4: 0.0}  # 4 at weight 0, 5 and 6 missing: never drawn
    docs = list(generate_corpus(n, seed=3, tasks=("addition", "sum"), level_weights=weights))
    levels = Counter(len(str(max(a, b))) for _, a, b in map(_sum_doc, docs))
    assert set(levels) == {1, 2, 3}, levels
    for level, w in weights.items():
        assert abs(levels[level] / n - w) < 0.03, (level, levels)
    # deterministic, and different from the unweighted corpus
    assert docs == list(
        generate_corpus(n, seed=3, tasks=("addition", "sum"), level_weights=weights)
    )
    uniform = Counter(
        len(str(max(a, b)))
        for _, a, b in map(_sum_doc, generate_corpus(n, seed=3, tasks=("addition", "sum")))
    )
    assert set(uniform) == {1, 2, 3, 4, 5, 6}


def test_task_weights_set_the_share_of_each_task():
    n = 4000
    docs = list(
        generate_corpus(
            n, seed=1, tasks=("addition", "countdown", "linear_equation"),
            task_weights={"addition": 0.7, "countdown": 0.3, "linear_equation": 0.0},
        )
    )  # fmt: skip
    kinds = Counter(
        "countdown" if "Using the numbers" in d else "linear" if "Solve for x" in d else "add"
        for d in docs
    )
    assert kinds["linear"] == 0, kinds
    assert abs(kinds["add"] / n - 0.7) < 0.03 and abs(kinds["countdown"] / n - 0.3) < 0.03, kinds
    # a task missing from the weights is never drawn either
    docs = list(generate_corpus(500, seed=1, tasks=("addition", "sum"), task_weights={"sum": 2}))
    assert {_sum_doc(d)[0] for d in docs} == {"sum"}


def test_direct_documents_state_only_the_last_line_of_the_solution():
    n, frac = 4000, 0.3
    kw = dict(seed=2, tasks=("addition", "sum"), levels=(2, 3))  # multi-line worked solutions
    plain = list(generate_corpus(n, **kw))
    mixed = list(generate_corpus(n, **kw, direct={"addition": frac}))
    assert len(mixed) == n
    n_add = n_direct = 0
    for p, d in zip(plain, mixed):
        task, a, b = _sum_doc(p)
        # the same problem at the same position: the direct share changes no draw
        assert _sum_doc(d) == (task, a, b)
        assert _answer(d) == _answer(p) == str(a + b)
        solution = _think(p).splitlines()
        assert len(solution) >= 3 and solution[-1] == f"So {a} + {b} = {a + b}."
        n_add += task == "addition"
        if d == p:
            continue
        assert task == "addition", d  # only the task named in `direct`
        n_direct += 1
        assert _think(d).splitlines() == [solution[-1]]
        assert _think(d) == solution[-1]
        assert d == p.replace(_think(p), solution[-1])
    assert n_add > 1500
    assert abs(n_direct / n_add - frac) < 0.03, (n_direct, n_add)
    # every document, direct or not, still verifies against its problem
    by_q = {}
    for level in (2, 3):
        for prob in get_task("addition").generate(3000, "train", seed=2, level=level):
            by_q[prob.question] = prob
    for d in mixed:
        if _sum_doc(d)[0] == "addition":
            q = d.split("\n", 1)[0][len("User: ") :]
            assert get_task("addition").verify_completion(by_q[q], d), d
    # fraction 1: every document of that task is direct
    docs = list(generate_corpus(200, seed=2, tasks=("sum",), levels=(3,), direct={"sum": 1.0}))
    assert all(len(_think(d).splitlines()) == 1 for d in docs)


def test_no_direct_share_leaves_the_corpus_unchanged():
    for kw in (
        {},
        dict(tasks=("addition", "sum"), levels=(2, 3)),
        dict(tasks=("addition", "countdown"), task_weights={"addition": 1, "countdown": 2}),
    ):
        default = list(generate_corpus(300, seed=4, **kw))
        names = kw.get("tasks", ("arithmetic", "countdown", "linear_equation"))
        for direct in (None, {}, {names[0]: 0}, {n: 0.0 for n in names}):
            docs = list(generate_corpus(300, seed=4, **kw, direct=direct))
            assert "\n\n".join(docs).encode() == "\n\n".join(default).encode(), (kw, direct)
    # the default corpus with no new argument is the corpus without them
    assert list(generate_corpus(300, seed=4)) == list(
        generate_corpus(300, seed=4, level_weights=None, task_weights=None, direct=None)
    )


@pytest.mark.parametrize(
    "kw, what",
    [
        (dict(level_weights={1: -1.0, 2: 1.0}), "level_weights"),
        (dict(level_weights={1: float("nan"), 2: 1.0}), "level_weights"),
        (dict(level_weights={1: 0.0, 2: 0.0}), "level_weights"),
        (dict(level_weights={9: 1.0}), "level_weights"),  # no level the task has
        (dict(task_weights={"addition": -1.0, "sum": 2.0}), "task_weights"),
        (dict(task_weights={"addition": float("nan"), "sum": 1.0}), "task_weights"),
        (dict(task_weights={"addition": 0, "sum": 0}), "task_weights"),
        (dict(direct={"countdown": 0.5}), "direct"),  # not a task of this corpus
        (dict(direct={"nope": 0.5}), "direct"),
        (dict(direct={"addition": 1.5}), "direct"),
        (dict(direct={"addition": -0.1}), "direct"),
        (dict(direct={"addition": float("nan")}), "direct"),
    ],
)
def test_bad_weights_and_direct_shares_are_refused(kw, what):
    with pytest.raises(TaskError, match=what):
        generate_corpus(10, tasks=("addition", "sum"), **kw)  # at the call, not on iteration


@pytest.mark.parametrize("split", ["train", "test"])
def test_weighted_direct_corpus_keeps_the_split(split):
    kw = dict(
        tasks=("addition", "sum"), levels=(1, 2), level_weights={1: 0.2, 2: 0.8},
        task_weights={"addition": 1, "sum": 3}, direct={"sum": 0.8, "addition": 0.5},
    )  # fmt: skip
    docs = list(generate_corpus(2000, seed=0, split=split, **kw))
    for d in docs:
        _, a, b = _sum_doc(d)
        assert split_of(arithmetic_key("+", a, b)) == split, d
    other = "test" if split == "train" else "train"
    other_docs = generate_corpus(2000, seed=0, split=other, **kw)
    questions = {d.split("\n", 1)[0] for d in docs}
    assert questions.isdisjoint(d.split("\n", 1)[0] for d in other_docs)


def test_weights_naming_no_corpus_task_or_level_are_refused():
    from nanoseek.data.corpus import generate_corpus
    from nanoseek.tasks.base import TaskError

    with pytest.raises(TaskError, match="task_weights: 'additon'"):
        generate_corpus(10, tasks=("addition",), task_weights={"addition": 1, "additon": 5})
    with pytest.raises(TaskError, match="level_weights: level 99"):
        generate_corpus(10, tasks=("addition",), level_weights={1: 1.0, 99: 5.0})


def test_chat_corpus_is_the_same_mix_in_the_chat_format(tmp_path):
    import json

    from nanoseek.data.corpus import generate_problems, write_chat_corpus
    from nanoseek.tasks import format_chat

    mix = dict(tasks=("addition", "sum"), levels=[1, 2], task_weights={"addition": 1, "sum": 1},
               direct={"sum": 1.0})  # fmt: skip
    path = tmp_path / "chat.jsonl"
    assert write_chat_corpus(path, 40, seed=3, **mix) == 40
    rows = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    problems = list(generate_problems(40, seed=3, **mix))
    assert rows == [format_chat(p) for p in problems]
    for msgs, p in zip(rows, problems):
        assert msgs[0] == {"role": "user", "content": p.question}
        think = msgs[-1]["content"].split("</think>")[0]
        if p.task == "sum":  # direct: one line of thinking, the answer still right
            assert think.count("\n") == 1 and think.endswith(f"= {p.answer}.")
        assert msgs[-1]["content"].endswith(f"<answer>{p.answer}</answer>")
    assert not list(tmp_path.glob("*.tmp"))
