"""Evaluating a task file: a test set is evaluated whole (`nanoseek eval --task FILE`, n = 0),
rows' "split" fields pick the test rows, generated tasks need a number of problems."""

import json

import pytest

from nanoseek.cli import main
from nanoseek.eval import evaluate, heldout_problems
from nanoseek.tasks import TaskError, get_task, resolve_task
from tests.eval.test_evaluate import model, scripted  # noqa: F401 - fixture
from tests.tasks.test_task_file_splits import write_task
from tests.train.test_sft import make_model_dir, tok, tok_dir  # noqa: F401 - fixtures


def test_a_20_problem_test_file_is_evaluated_whole(tmp_path, tok, model):  # noqa: F811
    test = resolve_task(write_task(tmp_path / "test.jsonl", 20), split="test")
    problems = heldout_problems(test, 0)
    assert len(problems) == 20 and {p.id for p in problems} == {p.id for p in test.problems}
    fn = scripted(tok, problems, lambda i, j: "right" if i < 5 else "wrong")
    r = evaluate(model, tok, test, 0, sample_fn=fn)
    assert r["n_problems"] == 20 and r["accuracy"] == pytest.approx(5 / 20)
    # a larger n than the file holds gives the file, with a warning
    with pytest.warns(UserWarning, match="only 20 distinct held-out problems"):
        assert len(heldout_problems(test, 50)) == 20


def test_split_fields_pick_the_rows_evaluated(tmp_path):
    splits = ["train" if i < 12 else None for i in range(20)]
    test = resolve_task(write_task(tmp_path / "mixed.jsonl", 20, splits), split="test")
    assert {p.question for p in heldout_problems(test, 0)} == {
        f"What is {i} squared?" for i in range(12, 20)
    }


def test_n_zero_needs_a_task_file():
    with pytest.raises(TaskError, match="n = 0 \\(all\\) is for task files"):
        heldout_problems(get_task("addition"), 0)
    with pytest.raises(ValueError, match=">= 0"):
        heldout_problems(get_task("addition"), -1)


def test_cli_eval_of_a_task_file_covers_it_whole(tmp_path, tok_dir, capsys):  # noqa: F811
    d = make_model_dir(tmp_path / "m", tok_dir)
    path = write_task(tmp_path / "test.jsonl", 20)
    args = ["eval", d, "--task", path, "--max-new-tokens", "2", "--json"]
    assert main(args) == 0  # default: every problem of a file
    assert json.loads(capsys.readouterr().out)["n_problems"] == 20
    assert main([*args, "--n", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["n_problems"] == 20
    assert main([*args, "--n", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["n_problems"] == 3
    assert main(["eval", d, "--task", "addition", "--n", "0", "--max-new-tokens", "2"]) == 2
    assert "is for task files" in capsys.readouterr().err
