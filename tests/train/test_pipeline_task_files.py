"""The pipeline on task files: nothing any stage trains on is ever evaluated on. Without
--eval_task a file keeps its hash split; with it, --task is trained on whole and the eval file
evaluated whole."""

import dataclasses
import os

import pytest

from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.tasks import resolve_task
from nanoseek.train.grpo import GRPOOptions
from nanoseek.train.pipeline import Pipeline, Runners, build_pipeline_options, run_pipeline
from nanoseek.train.sft_data import task_conversations
from tests.tasks.test_task_file_splits import write_task
from tests.train.test_pipeline import Stubs, base  # noqa: F401 - fixture


class Recording(Stubs):
    """Stubs whose evaluation records the problems each stage would be evaluated on."""

    def __init__(self):
        super().__init__()
        self.evaluated: list = []

    def evaluate(self, model_dir, task, **kw):
        from nanoseek.eval.evaluate import heldout_problems, resolve

        problems = heldout_problems(resolve(task), kw["n_problems"], kw["seed"], kw["level"])
        self.evaluated.append(problems)
        return {**super().evaluate(model_dir, task, **kw), "n_problems": len(problems)}

    def runners(self) -> Runners:
        return Runners(self.sft, self.grpo, self.rejection, self.evaluate)


def trained_on(stubs) -> set[str]:
    """Every question a stage could train on, as each trainer resolves its task."""
    (cold, _), _ = stubs.of("sft")
    ((rs, _),) = stubs.of("rejection")
    questions = {m[-2]["content"] for _, m in task_conversations(
        cold.task, cold.task_n, seed=cold.seed, holdout=cold.task_holdout)}  # fmt: skip
    rs_task = resolve_task(rs.task, split=None if rs.task_holdout else "train")
    questions |= {p.question for p in rs_task.problems if p.split == "train"}
    for grpo, _ in stubs.of("grpo"):  # GRPO resolves its tasks with the default: hash split
        for t in grpo.task:
            questions |= {p.question for p in resolve_task(t).problems if p.split == "train"}
    return questions


def test_one_file_keeps_the_hash_split_train_and_test_disjoint(tmp_path, base):  # noqa: F811
    path = write_task(tmp_path / "sq.jsonl", 300)
    stubs = Recording()
    opts = build_pipeline_options(None, ["--eval_n=0", "--cold_start_n=1000"], model=base,
                                  task=path, out=str(tmp_path / "run"))  # fmt: skip
    summary = run_pipeline("r1", opts, stubs.runners(), progress=False)
    (cold, _), _ = stubs.of("sft")
    ((rs, _),) = stubs.of("rejection")
    assert cold.task_holdout and rs.task_holdout
    evaluated = {p.question for p in stubs.evaluated[0]}
    assert all({p.question for p in ev} == evaluated for ev in stubs.evaluated)
    n_test = resolve_task(path).count("test")
    assert len(evaluated) == n_test == summary["eval"]["n_problems"] > 0
    trained = trained_on(stubs)
    assert trained and not trained & evaluated
    assert len(trained | evaluated) == 300  # the train part is all used


def test_eval_task_trains_on_the_task_whole_and_evaluates_the_eval_file_whole(tmp_path, base):  # noqa: F811
    train = write_task(tmp_path / "train.jsonl", 40)
    test = str(tmp_path / "test.jsonl")
    with open(test, "w") as f:  # other problems than train's
        for i in range(20):
            f.write(f'{{"question": "What is {i} cubed?", "answer": "{i**3}"}}\n')
    stubs = Recording()
    opts = build_pipeline_options(None, ["--eval_n=0", "--cold_start_n=1000"], model=base,
                                  task=train, eval_task=test, out=str(tmp_path / "run"))  # fmt: skip
    summary = run_pipeline("r1", opts, stubs.runners(), progress=False)
    (cold, _), _ = stubs.of("sft")
    ((rs, _),) = stubs.of("rejection")
    assert not cold.task_holdout and not rs.task_holdout
    assert len(task_conversations(cold.task, None, holdout=False)) == 40  # trained on whole
    assert all(len(ev) == 20 for ev in stubs.evaluated)  # evaluated whole
    assert summary["eval"]["n_problems"] == 20 and summary["eval_task"] == test
    assert not trained_on(stubs) & {p.question for p in stubs.evaluated[0]}
    md = open(os.path.join(opts.out, "summary.md")).read()
    assert f"{train} -> {test}" in md


def test_grpo_gets_the_eval_task_once_it_has_the_option(tmp_path, base):  # noqa: F811
    @dataclasses.dataclass
    class WithEvalTask(GRPOOptions):
        eval_task: str | None = None

    train, test = write_task(tmp_path / "a.jsonl", 20), write_task(tmp_path / "b.jsonl", 20)
    stubs = Stubs()
    opts = build_pipeline_options(None, [], model=base, task=train, eval_task=test,
                                  out=str(tmp_path / "run"))  # fmt: skip
    Pipeline("r1-zero", opts, stubs.runners(), grpo_options=WithEvalTask).run(progress=False)
    ((rl, _),) = stubs.of("grpo")
    assert rl.task == [train] and rl.eval_task == test


def test_the_same_file_as_eval_task_is_one_file(tmp_path, base):  # noqa: F811
    path = write_task(tmp_path / "sq.jsonl", 50)
    same = os.path.join(str(tmp_path), ".", "sq.jsonl")
    opts = build_pipeline_options(None, [], model=base, task=path, eval_task=same)
    assert not opts.separate_eval() and opts.holdout(path)
    assert opts.evaluated().given_as is None  # the hash split
    other = write_task(tmp_path / "other.jsonl", 5)
    with pytest.raises(ConfigError, match="'cold_start_task': .* is the eval_task"):
        Pipeline("r1", build_pipeline_options(
            None, [], model=base, task=path, eval_task=other, cold_start_task=other))  # fmt: skip
    with pytest.raises(ConfigError, match="'eval_n': 0 \\(all problems\\) is for task files"):
        Pipeline("r1", build_pipeline_options(None, ["--eval_n=0"], model=base, task="addition"))


def test_cli_pipeline_passes_eval_task(tmp_path, base, monkeypatch):  # noqa: F811
    import nanoseek.train.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda kind, opts: seen.update(opts=opts))
    train, test = write_task(tmp_path / "a.jsonl", 5), write_task(tmp_path / "b.jsonl", 5)
    args = ["pipeline", "r1", "--model", base, "--task", train, "--eval_task", test]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert (seen["opts"].task, seen["opts"].eval_task) == (train, test)
