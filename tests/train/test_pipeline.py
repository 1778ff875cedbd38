"""Pipelines: stage wiring, DONE markers, skip and resume, options, a real tiny run."""

import json
import os

import pytest

from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.tasks import TaskError, format_completion
from nanoseek.train.pipeline import (
    DONE,
    Pipeline,
    PipelineOptions,
    Runners,
    build_pipeline_options,
    read_done,
    run_pipeline,
)
from nanoseek.train.rejection import run_rejection, stats_path
from tests.eval.test_evaluate import question_of
from tests.train.test_sft import make_model_dir, tok, tok_dir  # noqa: F401 - fixtures

R1_STAGES = ["base", "base_chat", "cold_start", "reasoning_rl", "rejection_sft", "final_rl"]


class Stubs:
    """Stage runners that record their calls and write what the real ones would."""

    def __init__(self, fail_grpo: int = 0, kept: int = 3):
        self.calls: list[tuple[str, object, bool]] = []
        self.fail_grpo, self.kept = fail_grpo, kept

    def _model(self, out):
        os.makedirs(os.path.join(out, "model"), exist_ok=True)

    def sft(self, opts, resume, progress):
        self.calls.append(("sft", opts, resume))
        self._model(opts.out)
        return {"step": opts.max_steps, "loss": 1.0}

    def grpo(self, opts, resume, progress):
        self.calls.append(("grpo", opts, resume))
        os.makedirs(os.path.join(opts.out, "checkpoints"), exist_ok=True)
        if self.fail_grpo:
            self.fail_grpo -= 1
            raise KeyboardInterrupt  # interrupted mid-stage
        self._model(opts.out)
        return {"step": opts.max_steps, "reward": 0.5}

    def rejection(self, opts, progress):
        self.calls.append(("rejection", opts, False))
        with open(opts.out, "w") as f:
            f.write("{}\n")
        with open(stats_path(opts.out), "w") as f:
            json.dump({"prompts": 2, "samples": 8, "verified": 5, "kept": self.kept,
                       "acceptance_rate": self.kept / 8, "wrong": 3, "truncated": 0}, f)  # fmt: skip

    def evaluate(self, model_dir, task, **kw):
        self.calls.append(("eval", (model_dir, kw["template"]), False))
        acc = {"base": 0.1, "cold_start": 0.2, "reasoning_rl": 0.3, "rejection_sft": 0.35,
               "final_rl": 0.4, "rl": 0.25}  # fmt: skip
        stage = "base" if model_dir.endswith("base") else model_dir.split(os.sep)[-2]
        return {"accuracy": acc[stage], "pass@k": acc[stage] + 0.1, "k": kw["k"],
                "format_rate": 0.9, "mean_length": 40.0, "truncated": 0.0}  # fmt: skip

    def runners(self) -> Runners:
        return Runners(self.sft, self.grpo, self.rejection, self.evaluate)

    def of(self, kind):
        return [(opts, resume) for k, opts, resume in self.calls if k == kind]


@pytest.fixture
def base(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    return str(d)


def opts_for(base, out, *overrides):
    return build_pipeline_options(None, list(overrides), model=base, task="addition", out=out,
                                  eval_n=5, eval_k=2)  # fmt: skip


def test_r1_wires_the_stages_and_writes_the_summary(tmp_path, base, capsys):
    out = str(tmp_path / "run")
    stubs = Stubs()
    opts = opts_for(
        base,
        out,
        "--sft.lr=1e-4",
        "--grpo.max_steps=7",
        "--final_grpo.max_steps=3",
        "--rejection.samples=4",
        "--rejection_sft.data=extra.jsonl",
        "--level=2",
    )
    summary = run_pipeline("r1", opts, stubs.runners(), progress=False)
    (cold, _), (rs_sft, _) = stubs.of("sft")
    (rl, _), (final, _) = stubs.of("grpo")
    ((rs, _),) = stubs.of("rejection")
    j = lambda *p: os.path.join(out, *p)  # noqa: E731
    # (1) cold start: SFT of the base on the task's worked solutions
    assert (cold.model, cold.out, cold.task, cold.task_level) == (base, j("cold_start"),
                                                                  "addition", 2)  # fmt: skip
    assert cold.lr == 1e-4 and cold.task_n == 500
    # (2) reasoning RL from the cold start, chat template, accuracy + format + language
    assert (rl.model, rl.out, rl.task, rl.template) == (
        j("cold_start", "model"),
        j("reasoning_rl"),
        ["addition"],
        "chat",
    )
    assert set(rl.rewards) == {"accuracy", "format", "language"} and rl.max_steps == 7
    assert rl.task_level == 2
    # (3) rejection sampling from the RL model, SFT of the BASE on the samples (+ extra data)
    assert (rs.model, rs.out, rs.samples, rs.template) == (
        j("reasoning_rl", "model"),
        j("rejection_sft", "samples.jsonl"),
        4,
        "chat",
    )
    assert rs_sft.model == base and rs_sft.task is None and rs_sft.epochs == 2
    assert rs_sft.data == [j("rejection_sft", "samples.jsonl"), "extra.jsonl"]
    assert rs_sft.lr == 1e-4  # the sft section applies to both SFT stages
    # (4) final RL from the rejection-SFT model; its section overrides grpo's
    assert final.model == j("rejection_sft", "model") and final.max_steps == 3
    # every stage evaluated on the held-out split in its own template
    evals = [c[1] for c in stubs.calls if c[0] == "eval"]
    assert evals[:2] == [(base, "short"), (base, "chat")]  # the base in both formats
    assert all(t == "chat" for _, t in evals[2:])
    assert [r["stage"] for r in summary["stages"]] == R1_STAGES
    assert [r["pass@1"] for r in summary["stages"]] == [0.1, 0.1, 0.2, 0.3, 0.35, 0.4]
    done = read_done(j("rejection_sft"))
    assert done["metrics"]["rejection"]["kept"] == 3 and done["resumed"] is False
    assert done["model"] == j("rejection_sft", "model") and done["wall_s"] >= 0
    md = open(j("summary.md")).read()
    assert "| stage | template | pass@1 | pass@2 | format |" in md
    assert "| base | short | 10.0% |" in md and "| final_rl | chat | 40.0% | 50.0% |" in md
    assert "rejection_sft: rejection sampling kept 3 of 8 samples (37.5%)" in md
    assert json.load(open(j("summary.json")))["stages"][0]["stage"] == "base"
    assert "| cold_start | chat | 20.0% |" in capsys.readouterr().out


def test_finished_stages_are_skipped_and_an_interrupted_one_resumes(tmp_path, base):
    out = str(tmp_path / "run")
    first = Stubs(fail_grpo=1)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline("r1", opts_for(base, out), first.runners(), progress=False)
    done = [s for s in R1_STAGES if read_done(os.path.join(out, s))]
    assert done == ["base", "base_chat", "cold_start"]
    second = Stubs()
    summary = run_pipeline("r1", opts_for(base, out), second.runners(), progress=False)
    assert len(second.of("sft")) == 1  # only the rejection SFT: cold_start was done
    assert all(resume for _, resume in second.of("grpo") + second.of("sft"))
    evaluated = [c[1][0] for c in second.calls if c[0] == "eval"]
    assert base not in evaluated and len(evaluated) == 3
    assert read_done(os.path.join(out, "reasoning_rl"))["resumed"] is True
    assert read_done(os.path.join(out, "final_rl"))["resumed"] is False
    assert len(summary["stages"]) == 6
    third = Stubs()
    run_pipeline("r1", opts_for(base, out), third.runners(), progress=False)
    assert third.calls == []  # everything done: nothing runs, the summary is rewritten
    os.remove(os.path.join(out, "final_rl", DONE))  # remove a marker: that stage reruns
    fourth = Stubs()
    run_pipeline("r1", opts_for(base, out), fourth.runners(), progress=False)
    assert [k for k, _, _ in fourth.calls] == ["grpo", "eval"]


def test_rejection_sampling_is_not_repeated_once_finished(tmp_path, base):
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match="rejection sampling kept none of 8 samples"):
        run_pipeline("r1", opts_for(base, out), Stubs(kept=0).runners(), progress=False)
    with open(stats_path(os.path.join(out, "rejection_sft", "samples.jsonl")), "w") as f:
        json.dump({"kept": 2, "prompts": 1, "samples": 2, "verified": 2, "acceptance_rate": 1}, f)
    again = Stubs()
    run_pipeline("r1", opts_for(base, out), again.runners(), progress=False)
    assert again.of("rejection") == [] and len(again.of("sft")) == 1


def test_r1_zero_is_grpo_from_the_base(tmp_path, base):
    stubs = Stubs()
    summary = run_pipeline("r1-zero", opts_for(base, str(tmp_path / "z")), stubs.runners(),
                           progress=False)  # fmt: skip
    ((rl, resume),) = stubs.of("grpo")
    assert rl.model == base and rl.template == "short" and resume
    assert set(rl.rewards) == {"accuracy", "format"}  # rule rewards only [R1 §2.2]
    assert stubs.of("sft") == [] and [r["stage"] for r in summary["stages"]] == ["base", "rl"]


def test_options_from_toml_sections_and_overrides(tmp_path, base):
    cfg = tmp_path / "r1.toml"
    cfg.write_text('eval_n = 50\nlevel = 3\n[sft]\nlr = 0.001\nmax_steps = 20\n'
                   '[grpo]\nnum_generations = 4\n')  # fmt: skip
    o = build_pipeline_options(str(cfg), ["--eval_n=60", "--grpo.beta=0.001"], model=base,
                               task="addition")  # fmt: skip
    assert (o.eval_n, o.level) == (60, 3)
    assert build_pipeline_options(None, ["--task=countdown"], task="addition").task == "addition"
    assert o.sft == {"lr": 0.001, "max_steps": 20}
    assert o.grpo == {"num_generations": 4, "beta": "0.001"}
    with pytest.raises(ConfigError, match="unknown section 'sfx'"):
        build_pipeline_options(None, ["--sfx.lr=1"])
    with pytest.raises(ConfigError, match="unknown pipeline option 'evaln'"):
        build_pipeline_options(None, ["--evaln=1"])
    stubs = Stubs()
    bad = opts_for(base, str(tmp_path / "o"), "--sft.lrr=1")
    with pytest.raises(ConfigError, match="section 'sft': unknown option 'lrr'"):
        run_pipeline("r1", bad, stubs.runners(), progress=False)
    wired = opts_for(base, str(tmp_path / "w"), "--grpo.model=elsewhere")
    with pytest.raises(ConfigError, match="'grpo.model' is set by the pipeline"):
        run_pipeline("r1", wired, stubs.runners(), progress=False)
    with pytest.raises(ConfigError, match="unknown pipeline 'r2'; valid pipelines: r1-zero, r1"):
        Pipeline("r2", opts_for(base, str(tmp_path / "x")))
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks:"):
        Pipeline("r1", PipelineOptions(model=base, task="nope"))
    with pytest.raises(ConfigError, match="has no level 9"):
        Pipeline("r1", PipelineOptions(model=base, task="addition", level=9))


def test_cold_start_task_goes_to_the_cold_start_sft_only(tmp_path, base):
    out = str(tmp_path / "run")
    stubs = Stubs()
    tasks = []
    real_eval = stubs.evaluate

    def evaluate(model_dir, task, **kw):
        tasks.append(task)
        return real_eval(model_dir, task, **kw)

    runners = Runners(stubs.sft, stubs.grpo, stubs.rejection, evaluate)
    opts = opts_for(base, out, "--cold_start_task=sum", "--level=2")
    assert (opts.task, opts.cold_start_task) == ("addition", "sum")
    summary = run_pipeline("r1", opts, runners, progress=False)
    (cold, _), (rs_sft, _) = stubs.of("sft")
    (rl, _), (final, _) = stubs.of("grpo")
    ((rs, _),) = stubs.of("rejection")
    assert (cold.task, cold.task_level, cold.out) == ("sum", 2, os.path.join(out, "cold_start"))
    assert cold.task_n == 500 and cold.model == base
    # every other stage keeps the pipeline's task: RL prompts, rejection sampling, evaluations
    assert rl.task == ["addition"] and final.task == ["addition"]
    assert rl.model == os.path.join(out, "cold_start", "model")
    assert rs.task == "addition" and rs_sft.task is None
    assert tasks and set(tasks) == {"addition"}
    assert [r["stage"] for r in summary["stages"]] == R1_STAGES
    # None (the default): the cold start uses the pipeline's task
    plain = Stubs()
    run_pipeline("r1", opts_for(base, str(tmp_path / "p")), plain.runners(), progress=False)
    assert plain.of("sft")[0][0].task == "addition"


def test_cold_start_task_is_validated(tmp_path, base):
    with pytest.raises(TaskError, match="unknown task 'nope'; valid tasks:"):
        Pipeline("r1", PipelineOptions(model=base, task="addition", cold_start_task="nope"))
    # countdown has no level 1, addition has: the cold-start task's levels are checked too
    with pytest.raises(ConfigError, match="task 'countdown' has no level 1"):
        Pipeline(
            "r1", PipelineOptions(model=base, task="addition", cold_start_task="countdown", level=1)
        )
    Pipeline("r1", PipelineOptions(model=base, task="addition", cold_start_task="countdown"))
    Pipeline("r1", PipelineOptions(model=base, task="addition", cold_start_task="sum", level=6))


def test_cold_start_data_replaces_the_task_examples(tmp_path, base):
    from nanoseek.data.corpus import write_chat_corpus

    data = str(tmp_path / "cold.jsonl")
    assert write_chat_corpus(data, 5, tasks=("addition",), levels=[2]) == 5
    stubs = Stubs()
    opts = opts_for(base, str(tmp_path / "run"), f"--cold_start_data={data}")
    run_pipeline("r1", opts, stubs.runners(), progress=False)
    (cold, _), (rs_sft, _) = stubs.of("sft")
    assert cold.data == [data] and cold.task is None
    assert stubs.of("grpo")[0][0].task == ["addition"]  # RL keeps the pipeline's task
    with pytest.raises(ConfigError, match="option 'cold_start_data': no such file"):
        Pipeline("r1", PipelineOptions(model=base, task="addition",
                                       cold_start_data=str(tmp_path / "missing.jsonl")))  # fmt: skip


def test_cli_pipeline_errors(tmp_path, base, capsys):
    assert main(["pipeline", "r1", "--model", base, "--task", "nope"]) == 2
    assert "valid tasks:" in capsys.readouterr().err
    assert main(["pipeline", "r3", "--model", base, "--task", "addition"]) == 2
    assert "invalid choice: 'r3'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a real run
def perfect_teacher(tok):  # noqa: F811
    """Rejection sampling's SampleFn for the real run: a random tiny model solves nothing, so
    the RL checkpoint's samples are replaced by right answers (everything else is real)."""
    from nanoseek.tasks import get_task

    def sample_fn(model, prompts, max_new_tokens, temperature, seed):
        problems = get_task("addition").generate(50, "train", seed=0, level=1)
        by_q = {p.question: p for p in problems}
        out = []
        for i, ids in enumerate(prompts):
            text = format_completion(by_q[question_of(tok, ids)])
            out.append(tok.encode(text if i % 2 else text.replace(".", ". ")) + [tok.eos_id])
        return out

    return sample_fn


def test_real_tiny_r1_pipeline_end_to_end(tmp_path, tok_dir, tok, capsys):  # noqa: F811
    base = make_model_dir(tmp_path / "base", tok_dir)
    out = str(tmp_path / "r1")
    small = ["--max_steps=2", "--batch_size=2", "--seq_len=128", "--eval_every=0",
             "--save_every=100", "--plot=false", "--warmup_steps=0"]  # fmt: skip
    rl = ["--num_generations=2", "--prompts_per_step=2", "--max_completion_length=6"]
    overrides = [*[f"--sft.{o[2:]}" for o in small], "--sft.task_n=8",
                 *[f"--grpo.{o[2:]}" for o in small if "seq_len" not in o],
                 *[f"--grpo.{o[2:]}" for o in rl], "--grpo.max_steps=1", "--grpo.batch_size=4",
                 "--rejection.n_prompts=2", "--rejection.samples=2",
                 "--eval_n=2", "--eval_k=1", "--eval_max_new_tokens=6", "--level=1"]  # fmt: skip
    opts = build_pipeline_options(None, overrides, model=base, task="addition", out=out)
    runners = Runners(rejection=lambda o, progress: run_rejection(
        o, progress, sample_fn=perfect_teacher(tok)))  # fmt: skip
    summary = run_pipeline("r1", opts, runners, progress=False)
    assert [r["stage"] for r in summary["stages"]] == R1_STAGES
    for stage in R1_STAGES[2:]:
        assert os.path.isfile(os.path.join(out, stage, "model", "config.json"))
        assert read_done(os.path.join(out, stage))["eval"]["n_problems"] == 2
    assert json.load(open(os.path.join(out, "rejection_sft", "samples.json")))["kept"] == 4
    assert os.path.isfile(os.path.join(out, "summary.md"))
    # the CLI: everything is done, so it only prints the table
    code = main(["pipeline", "r1", "--model", base, "--task", "addition", "--out", out,
                 *overrides])  # fmt: skip
    assert code == 0 and "| final_rl |" in capsys.readouterr().out
