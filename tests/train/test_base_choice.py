"""Choosing the RL base among pre-training checkpoints by train-split accuracy."""

import json
import os

import pytest

from nanoseek.checkpoint.trainer_state import STATE_NAME
from nanoseek.train import base_choice
from nanoseek.train.base_choice import choose_base, train_split_accuracy
from tests.train.test_sft import make_model_dir, tok_dir  # noqa: F401 - fixtures


def fake_run(tmp_path, steps):
    """A pre-training run directory with a (weightless) checkpoint at each step."""
    for s in steps:
        d = tmp_path / "checkpoints" / f"step-{s:06d}"
        d.mkdir(parents=True)
        (d / STATE_NAME).write_text("{}")
        (d / "config.json").write_text(json.dumps({"step": s}))
        (d / "model.safetensors").write_bytes(b"weights of step %d" % s)
    return str(tmp_path)


@pytest.fixture
def scripted(monkeypatch):
    """train_split_accuracy replaced by a table {step: pass@1}; records which steps ran."""
    calls = []

    def install(table):
        def fake(path, task, level, n, k, template, max_new_tokens, seed):
            step = int(os.path.basename(path).split("-")[1])
            calls.append(step)
            return {"pass@1": table[step], "pass@k": min(1.0, 3 * table[step]), "k": k, "n": n}

        monkeypatch.setattr(base_choice, "train_split_accuracy", fake)
        return calls

    return install


def test_newest_qualifying_checkpoint_wins_and_scan_stops(tmp_path, scripted):
    run = fake_run(tmp_path, [100, 200, 300, 400])
    calls = scripted({100: 0.05, 200: 0.2, 300: 0.6, 400: 0.9})
    c = choose_base(run, "sum", 2, max_pass1=0.35, log=lambda *_: None)
    assert c["step"] == 200 and c["qualified"] and c["pass@1"] == 0.2
    assert calls == [400, 300, 200]  # newest first, stops at the first that qualifies
    assert set(c["checked"]) == {"400", "300", "200"}
    # the chosen weights, not the final ones, are the base
    with open(os.path.join(c["model"], "model.safetensors"), "rb") as f:
        assert f.read() == b"weights of step 200"
    assert c["model"] == os.path.join(run, "base")


def test_final_checkpoint_costs_one_evaluation_when_it_qualifies(tmp_path, scripted):
    run = fake_run(tmp_path, [100, 200])
    calls = scripted({100: 0.0, 200: 0.1})
    assert choose_base(run, "sum", 2, max_pass1=0.35, log=lambda *_: None)["step"] == 200
    assert calls == [200]


def test_none_qualifies_gives_the_lowest_unqualified(tmp_path, scripted):
    run = fake_run(tmp_path, [100, 200, 300])
    scripted({100: 0.5, 200: 0.4, 300: 0.95})
    c = choose_base(run, "sum", 2, max_pass1=0.35, log=lambda *_: None)
    assert c["step"] == 200 and not c["qualified"]


def test_min_step_excludes_early_checkpoints(tmp_path, scripted):
    run = fake_run(tmp_path, [100, 200, 300])
    calls = scripted({100: 0.1, 200: 0.8, 300: 0.9})
    c = choose_base(run, "sum", 2, max_pass1=0.35, min_step=200, log=lambda *_: None)
    assert c["step"] == 200 and not c["qualified"] and 100 not in calls
    with pytest.raises(FileNotFoundError, match="no checkpoints at or after step 400"):
        choose_base(str(tmp_path), "sum", 2, min_step=400, out=str(tmp_path / "other"))


def test_rerun_reads_the_cached_choice(tmp_path, scripted):
    run = fake_run(tmp_path, [100, 200])
    calls = scripted({100: 0.1, 200: 0.9})
    first = choose_base(run, "sum", 2, max_pass1=0.35, log=lambda *_: None)
    n = len(calls)
    assert choose_base(run, "sum", 2, max_pass1=0.35, log=lambda *_: None) == first
    assert len(calls) == n
    # another threshold is another choice: measured again, not read from the cache
    assert choose_base(run, "sum", 2, max_pass1=0.95, log=lambda *_: None)["step"] == 200
    assert len(calls) == n + 1


def test_bad_threshold_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_pass1"):
        choose_base(str(tmp_path), "sum", 2, max_pass1=1.5)


def test_train_split_accuracy_of_a_real_checkpoint(tmp_path, tok_dir):  # noqa: F811
    model = make_model_dir(tmp_path / "m", tok_dir)
    r = train_split_accuracy(model, "addition", 1, n=3, k=2, template="short",
                             max_new_tokens=8, seed=0)  # fmt: skip
    assert r["n"] == 3 and r["k"] == 2
    assert 0.0 <= r["pass@1"] <= r["pass@k"] <= 1.0
