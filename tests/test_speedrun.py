"""`nanoseek speedrun`: the smoke mode end to end, and resume / interruption with stub stages."""

from __future__ import annotations

import json
import os

import pytest

from nanoseek import speedrun
from nanoseek.config import ConfigError
from nanoseek.speedrun import SpeedrunOptions, read_done, run_speedrun
from nanoseek.speedrun_report import HEADLINE_KEYS
from nanoseek.tasks.base import TaskError

ALL = ["tokenizer", "pretrain", "fp8_vs_bf16", "r1_zero", "r1", "distill", "student_rl",
       "speculative"]  # fmt: skip


def test_smoke_speedrun_end_to_end_then_rerun_skips_everything(tmp_path, monkeypatch):
    out = str(tmp_path / "sr")
    card = run_speedrun(SpeedrunOptions(out=out, smoke=True, fp8=True, threads=1), progress=False)
    assert list(card["stages"]) == ALL
    for stage in ALL:
        assert read_done(os.path.join(out, stage))["wall_s"] >= 0
    res = {s: d["result"] for s, d in card["stages"].items()}
    assert res["tokenizer"]["documents"] == 2000
    assert os.path.isfile(os.path.join(res["pretrain"]["model"], "tokenizer.json"))
    assert res["pretrain"]["precision"] == "fp8" and len(res["pretrain"]["val_loss"]) >= 1
    # the base is a measured checkpoint (an untrained model's final one qualifies), and every
    # later stage starts from it
    choice = res["pretrain"]["base_choice"]
    assert choice["qualified"] and choice["step"] == 12 and list(choice["checked"]) == ["12"]
    assert res["pretrain"]["model"] == choice["model"] == os.path.join(out, "pretrain", "base")
    assert res["r1"]["summary"]["stages"][0]["model"] == choice["model"]
    assert "The base is the newest checkpoint" in open(os.path.join(out, "report.md")).read()
    assert res["fp8_vs_bf16"]["rel_diff"] >= 0
    rows = res["r1"]["summary"]["stages"]
    assert [r["stage"] for r in rows] == [
        "base", "base_chat", "cold_start", "reasoning_rl", "rejection_sft", "final_rl",
    ]  # fmt: skip
    assert res["r1"]["final_model"].endswith(os.path.join("final_rl", "model"))
    assert [r["stage"] for r in res["r1_zero"]["summary"]["stages"]] == ["base", "rl"]
    # the student's RL ran for the distillation's training time, at least one step
    assert res["student_rl"]["budget_s"] > 0 and res["student_rl"]["steps"] >= 1
    head = card["headline"]
    assert list(head) == list(HEADLINE_KEYS)
    for key in HEADLINE_KEYS[:7]:
        assert isinstance(head[key], float) and 0 <= head[key] <= 1, key
    assert head["base_pass1"] == rows[0]["pass@1"] and head["final_pass1"] == rows[-1]["pass@1"]
    assert head["mtp_identical"] is True and head["mtp_speedup"] > 0 and head["wall_s"] > 0
    saved = json.load(open(os.path.join(out, "report.json")))["headline"]
    assert saved == head
    assert res["distill"]["student_params"] < res["distill"]["teacher_params"]
    assert 0 <= res["distill"]["init_eval"]["accuracy"] <= 1
    assert 0 <= res["distill"]["eval"]["accuracy"] <= 1
    # greedy MTP speculative decoding must reproduce plain greedy decoding exactly
    assert res["speculative"]["greedy_identical"] is True
    assert len(res["speculative"]["acceptance"]) == 1
    assert 1 <= res["speculative"]["reply_tokens"] <= res["speculative"]["new_tokens"]
    md = open(os.path.join(out, "report.md")).read()
    for stage in ALL:
        assert f"| {stage} |" in md
    for rel in ("pretrain/loss.png", "plots/accuracy.png", "plots/decode_speed.png",
                "fp8_vs_bf16/fp8_vs_bf16.png", "plots/r1_zero_rl_curves.png",
                "plots/r1_reasoning_rl_curves.png"):  # fmt: skip
        assert f"]({rel})" in md and os.path.isfile(os.path.join(out, rel)), rel
    assert "smoke mode" in md and "Machine:" in md and "Effective hyperparameters" in md
    assert "held-out prompts, each reply to its end (" in md
    assert "## Headline" in md and "## R1-Zero" in md and "zero reward variance" in md
    assert md.rstrip().endswith("```") and f"nanoseek chat {res['r1']['final_model']}" in md

    # a re-run finds every stage done: nothing runs again, the report is rewritten
    def boom(ctx):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(speedrun, "RUNNERS", {s: boom for s in ALL})
    os.remove(os.path.join(out, "report.md"))
    run_speedrun(SpeedrunOptions(out=out, smoke=True, fp8=True, threads=1), progress=False)
    assert os.path.isfile(os.path.join(out, "report.md"))


class Stubs:
    """Stage runners that record their calls; `fail` raises KeyboardInterrupt in one stage."""

    def __init__(self, fail: str | None = None):
        self.calls: list[str] = []
        self.fail = fail

    def runners(self) -> dict:
        def make(name):
            def run(ctx):
                self.calls.append(name)
                if name == self.fail:
                    os.makedirs(ctx.dir(name, "checkpoints"), exist_ok=True)  # partial work
                    raise KeyboardInterrupt
                return {"stage": name}

            return run

        return {s: make(s) for s in ALL}


@pytest.fixture
def no_report(monkeypatch):
    monkeypatch.setattr(speedrun, "write_report", lambda *a, **k: {"stages": {}})


def test_interrupted_run_resumes_without_redoing_finished_stages(tmp_path, monkeypatch,
                                                                 no_report):  # fmt: skip
    out = str(tmp_path / "sr")
    first = Stubs(fail="r1")
    monkeypatch.setattr(speedrun, "RUNNERS", first.runners())
    with pytest.raises(KeyboardInterrupt):
        run_speedrun(SpeedrunOptions(out=out), progress=False)
    # no fp8 stage without --fp8
    assert first.calls == ["tokenizer", "pretrain", "r1_zero", "r1"]
    assert read_done(os.path.join(out, "pretrain"))["result"] == {"stage": "pretrain"}
    assert read_done(os.path.join(out, "r1")) is None
    second = Stubs()
    monkeypatch.setattr(speedrun, "RUNNERS", second.runners())
    run_speedrun(SpeedrunOptions(out=out), progress=False)
    assert second.calls == ["r1", "distill", "student_rl", "speculative"]
    assert read_done(os.path.join(out, "r1"))["resumed"] is True  # its partial work was there
    # the interrupted attempt's time counts in the stage's wall time
    assert float(open(os.path.join(out, "r1", "partial_wall_s")).read()) >= 0
    assert read_done(os.path.join(out, "distill"))["resumed"] is False


def test_rerun_with_other_options_is_refused(tmp_path, monkeypatch, no_report):
    out = str(tmp_path / "sr")
    monkeypatch.setattr(speedrun, "RUNNERS", Stubs().runners())
    run_speedrun(SpeedrunOptions(out=out), progress=False)
    with pytest.raises(ConfigError, match="pretrain_steps: 1500 there, 5 now"):
        run_speedrun(SpeedrunOptions(out=out, pretrain_steps=5), progress=False)
    run_speedrun(SpeedrunOptions(out=out, threads=1), progress=False)  # threads may change
    assert json.load(open(os.path.join(out, "speedrun.json")))["options"]["pretrain_steps"] == 1500


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match="option 'preset'"):
        SpeedrunOptions(preset="huge").validate()
    with pytest.raises(ConfigError, match="option 'level'"):
        SpeedrunOptions(level=99).validate()
    with pytest.raises(ConfigError, match="option 'reasoning_rl_steps' must be >= 1"):
        SpeedrunOptions(reasoning_rl_steps=0).validate()
    with pytest.raises(ConfigError, match="option 'grpo_generations' must be >= 2"):
        SpeedrunOptions(grpo_generations=1).validate()
    with pytest.raises(ConfigError, match="option 'sft_lr' must be > 0"):
        SpeedrunOptions(sft_lr=0.0).validate()
    with pytest.raises(ConfigError, match="option 'corpus_levels'"):
        SpeedrunOptions(corpus_levels={"9": 1.0}).validate()
    with pytest.raises(ConfigError, match="option 'corpus_direct'"):
        SpeedrunOptions(corpus_direct={"sum": 1.5}).validate()
    with pytest.raises(ConfigError, match="option 'corpus_tasks'"):
        SpeedrunOptions(corpus_tasks={"sum": 0.0}).validate()
    with pytest.raises(ConfigError, match="'student_layers' \\(9\\) exceeds the 'tiny' preset's 4"):
        SpeedrunOptions(student_layers=9).validate()
    SpeedrunOptions(threads=0).validate()  # torch's default
    with pytest.raises(TaskError, match="valid tasks: addition"):
        SpeedrunOptions(task="nope").validate()


def test_cli_runs_the_stages_and_points_at_the_result(tmp_path, monkeypatch, capsys):
    from nanoseek.cli import main

    out = str(tmp_path / "sr")
    stubs = Stubs()
    runners = stubs.runners()
    runners["r1"] = lambda ctx: {"final_model": ctx.dir("r1", "final_rl", "model")}
    monkeypatch.setattr(speedrun, "RUNNERS", runners)
    monkeypatch.setattr(speedrun, "write_report",
                        lambda opts, *a: {"stages": {s: read_done(os.path.join(opts.out, s))
                                                     for s in ALL if s != "fp8_vs_bf16"}})  # fmt: skip
    assert main(["speedrun", "--out", out, "--smoke", "--final_rl_steps=3"]) == 0
    printed = capsys.readouterr().out
    assert f"nanoseek chat {os.path.join(out, 'r1', 'final_rl', 'model')}" in printed
    saved = json.load(open(os.path.join(out, "speedrun.json")))["options"]
    assert saved["smoke"] is True and saved["final_rl_steps"] == 3 and saved["fp8"] is False
    assert main(["speedrun", "--out", str(tmp_path / "b"), "--eval_n=0"]) == 2
    assert "option 'eval_n' must be >= 1" in capsys.readouterr().err
    assert main(["speedrun", "--out", str(tmp_path / "b"), "--bogus=1"]) == 2
    assert "unknown option 'bogus'" in capsys.readouterr().err
