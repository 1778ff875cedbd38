"""SFT on a task file: a training set gone through whole, in epochs without replacement; a task
file given to --data is refused with the way out."""

import json
from collections import Counter

import pytest

from nanoseek.cli import main
from nanoseek.tasks import resolve_task
from nanoseek.train.sft import SFTOptions, prepare_datasets
from nanoseek.train.sft_data import SFTDataError, load_examples, task_conversations
from tests.tasks.test_task_file_splits import write_task
from tests.train.test_sft import make_model_dir, tok, tok_dir  # noqa: F401 - fixtures


def with_solutions(path, n, splits=None):
    write_task(path, n, splits)
    rows = [json.loads(line) for line in open(path)]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "solution": f"{r['question'][8:-9]} times itself."}) + "\n")
    return str(path)


def ids(convs):
    return Counter(where.split(": ", 1)[1] for where, _ in convs)


def test_a_train_file_is_trained_on_whole_once_per_epoch(tmp_path):
    path = with_solutions(tmp_path / "train.jsonl", 20)
    every = {p.id for p in resolve_task(path, split="train").problems}
    once = task_conversations(path, None, holdout=False)  # task_n = None: len(file)
    assert ids(once) == Counter(every)
    assert ids(task_conversations(path, 20, holdout=False)) == Counter(every)
    assert ids(task_conversations(path, 40, seed=1, holdout=False)) == Counter(
        {i: 2 for i in every}
    )  # two epochs, each problem twice
    # holdout (the pipeline, when the same file is evaluated): the hash test part stays out
    hashed = resolve_task(path)
    kept = ids(task_conversations(path, None, holdout=True))
    assert set(kept) == {p.id for p in hashed.problems if p.split == "train"} != every


def test_rows_marked_test_are_not_trained_on(tmp_path):
    splits = ["test" if i < 4 else None for i in range(20)]
    path = with_solutions(tmp_path / "mixed.jsonl", 20, splits)
    convs = task_conversations(path, None, holdout=False)
    assert len(convs) == 16
    assert all("What is 0 squared?" not in m[-2]["content"] for _, m in convs)


def test_sft_task_n_len_covers_every_problem(tmp_path, tok):  # noqa: F811
    path = with_solutions(tmp_path / "train.jsonl", 20)
    opts = SFTOptions(task=path, val_fraction=0, seq_len=128)
    ds, _, stats = prepare_datasets(opts, tok, seed=0, batch_size=2, eval_batches=0)
    assert stats.examples == 20 and len(ds.examples) == 20


def test_a_task_file_given_as_data_says_to_pass_it_as_task(tmp_path, tok, tok_dir, capsys):  # noqa: F811
    path = write_task(tmp_path / "gsm.jsonl", 3)
    with pytest.raises(SFTDataError, match=f"{path}: a task file .* pass it as --task {path}"):
        load_examples([path], tok, 64)
    d = make_model_dir(tmp_path / "m", tok_dir)
    assert main(["sft", "--model", d, "--data", path, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pass it as --task {path}" in err
    # "prompt" is the task format's synonym of "question": still a task file, not chat data
    alias = tmp_path / "alias.jsonl"
    alias.write_text('{"prompt": "What is 2 squared?", "answer": "4"}\n')
    with pytest.raises(SFTDataError, match="pass it as --task"):
        load_examples([alias], tok, 64)
