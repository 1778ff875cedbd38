"""Post-training pipelines: R1-Zero (RL straight from the base) and R1 (four stages) [R1 §2].

    nanoseek pipeline r1-zero --model runs/tiny/model --task addition --out runs/r1zero
    nanoseek pipeline r1 --model runs/tiny/model --task addition --out runs/r1 \\
        --sft.max_steps=300 --grpo.max_steps=100 --rejection.samples=8 --eval_n=200
    nanoseek pipeline r1 --config r1.toml ...   # top-level keys + [sft] [grpo] ... tables

Stages (each writes OUT/<stage>/, its model in OUT/<stage>/model):
    r1-zero  base (evaluated only) -> rl: GRPO from the base, accuracy + format rewards [R1 §2.2]
    r1       base -> base_chat (the base evaluated in the tuned stages' template, when it
                     differs from `base_template`: a like-for-like row for the cold start)
                  -> cold_start: SFT of the base on the task's worked solutions [R1 §2.3.1]
                  -> reasoning_rl: GRPO from cold_start, accuracy + format + language rewards
                     (R1 adds language consistency in this stage because RL alone drifts into
                     mixed-language, hard-to-read reasoning) [§2.3.2]
                  -> rejection_sft: rejection sampling from reasoning_rl (train split; kept:
                     correct, well-formed, readable, de-duplicated), then SFT of the *base* model
                     on those samples (plus `rejection_sft.data` files: R1 adds ~200k
                     non-reasoning samples here) [§2.3.3]
                  -> final_rl: GRPO from rejection_sft [§2.3.4: "RL for all scenarios"; with
                     only rule-based tasks at hand, it is reasoning RL again]

Splits. Every stage is evaluated on problems no stage trained on. Without `eval_task`, a task file
keeps the 10% hash split of generated tasks: SFT, RL and rejection sampling draw from its train
part, evaluation from its test part (rows with a "split" field keep theirs). With `eval_task`
(e.g. `--task train.jsonl --eval_task test.jsonl`), the stages train on the task file whole and
are evaluated on the eval_task file whole (`eval_n=0`: every problem of it).

Checkpointing. A finished stage leaves OUT/<stage>/DONE (JSON: metrics, held-out evaluation,
wall time) and is skipped on a re-run; a stage without DONE is re-entered with resume=True, so
the trainers continue from their last checkpoint (rejection sampling reruns only if its
statistics file, written last, is missing). Every stage's model is evaluated on the task's
held-out split; the table (stage, pass@1, pass@k, format rate, wall time) is printed and
written to OUT/summary.md and OUT/summary.json.

Options. `PipelineOptions` holds what all stages share; each section (`sft`, `grpo`,
`rejection`, `rejection_sft`, `final_grpo`) holds overrides of that stage's own options
dataclass (SFTOptions, GRPOOptions, RejectionOptions). `rejection_sft` starts from `sft` and
`final_grpo` from `grpo`, so a setting given once applies to both stages. The fields that wire
stages together (model, out, task, ...) are the pipeline's and cannot be overridden.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanoseek.config import ConfigError
from nanoseek.eval.evaluate import evaluate_checkpoint
from nanoseek.eval.sampling import CHAT, check_template
from nanoseek.fsio import write_text
from nanoseek.tasks.resolve import resolve_task, same_file
from nanoseek.train.grpo import GRPOOptions, run_grpo
from nanoseek.train.options import build, read_file
from nanoseek.train.rejection import RejectionOptions, run_rejection, stats_path
from nanoseek.train.sft import SFTOptions, run_sft

KINDS = ("r1-zero", "r1")
SECTIONS = ("sft", "grpo", "rejection", "rejection_sft", "final_grpo")
DONE = "DONE"


@dataclass
class PipelineOptions:
    model: str = ""  # the base checkpoint directory (pre-trained, with its tokenizer)
    task: str = ""  # task name or task JSONL: SFT data, RL prompts, rejection prompts, eval
    # a task file (or name) to evaluate every stage on instead of `task`'s held-out split: a
    # test set, evaluated whole; `task` is then a training set, trained on whole
    eval_task: str | None = None
    out: str = "runs/pipeline"
    level: int | None = None  # task level of every stage; None: all levels
    template: str = CHAT  # prompt format of the tuned stages (r1); chat | short | r1zero
    base_template: str = "short"  # the base model's format (the pre-training corpus'); r1-zero
    # trains and evaluates every stage in it, r1 evaluates the base row in it
    eval_n: int = 100  # held-out problems per evaluation; 0: every one of a task file
    eval_k: int = 4  # samples per problem: pass@1 is their mean, pass@k from all of them
    eval_temperature: float | None = None  # None: greedy for k = 1, else 0.6 (R1's)
    eval_max_new_tokens: int = 256
    cold_start_n: int = 500  # worked solutions in the cold-start SFT data ("a few hundred")
    # their task (None: `task`): worked solutions of a related task teach the format and a
    # readable pattern [R1 §2.3.1] without training on the RL task's own prompts
    cold_start_task: str | None = None
    # or a chat JSONL file of cold-start examples, used instead of drawing them from a task
    cold_start_data: str | None = None
    seed: int = 0
    sft: dict[str, Any] = field(default_factory=dict)
    grpo: dict[str, Any] = field(default_factory=dict)
    rejection: dict[str, Any] = field(default_factory=dict)
    rejection_sft: dict[str, Any] = field(default_factory=dict)
    final_grpo: dict[str, Any] = field(default_factory=dict)

    def separate_eval(self) -> bool:
        """Is an eval_task given that is not `task` itself (so `task` is trained on whole)?"""
        e = self.eval_task
        return bool(e) and e != self.task and not same_file(e, self.task)

    def evaluated(self):
        """The task every stage is evaluated on: a name, or a resolved task file (a test set
        when separate, else its hash split)."""
        name = self.eval_task if self.separate_eval() else self.task
        if not os.path.isfile(name):
            return name
        return resolve_task(name, split="test" if self.separate_eval() else None)

    def holdout(self, task: str | None) -> bool:
        """Must a trainer given `task` keep a file's hash test split out? When it is the file
        every stage is evaluated on."""
        evaluated = self.eval_task if self.separate_eval() else self.task
        return task == evaluated or same_file(task, evaluated)

    def validate(self) -> None:
        if not self.model or not os.path.isdir(self.model):
            raise ConfigError(f"option 'model': {self.model!r} is not a checkpoint directory")
        if not self.task:
            raise ConfigError("no task: give --task NAME")
        task = resolve_task(self.task)  # an unknown name fails now, listing the valid ones
        if self.cold_start_data and not os.path.isfile(self.cold_start_data):
            raise ConfigError(f"option 'cold_start_data': no such file {self.cold_start_data!r}")
        tasks = [task] + ([resolve_task(self.cold_start_task)] if self.cold_start_task else [])
        if self.separate_eval():
            evaluated = resolve_task(self.eval_task, split="test")
            if self.cold_start_task and self.holdout(self.cold_start_task):
                raise ConfigError(
                    f"option 'cold_start_task': {self.cold_start_task} is the eval_task, "
                    "which is evaluated whole: training on it would train on test problems"
                )
            if self.eval_n == 0 and evaluated.count("test", self.level) is None:
                raise ConfigError("option 'eval_n': 0 (all problems) is for task files")
            tasks.append(evaluated)
        elif self.eval_n == 0 and task.count("test", self.level) is None:
            raise ConfigError("option 'eval_n': 0 (all problems) is for task files")
        for t in tasks:
            if self.level is not None and self.level not in t.levels:
                raise ConfigError(
                    f"option 'level': task {t.name!r} has no level {self.level}; valid levels: "
                    f"{', '.join(map(str, t.levels))}"
                )
        check_template(self.template)
        check_template(self.base_template)
        if self.eval_n < 0:
            raise ConfigError(f"option 'eval_n' must be >= 0 (0: all), got {self.eval_n}")
        for name in ("eval_k", "eval_max_new_tokens", "cold_start_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")


def build_pipeline_options(
    file: str | None = None, overrides: list[str] | None = None, **values
) -> PipelineOptions:
    """PipelineOptions from a TOML/JSON file (top-level keys plus one table per section), then
    `--key=value` / `--section.key=value` overrides, then keyword values."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}

    def put(key: str, value: Any, where: str) -> None:
        head, dot, rest = key.partition(".")
        if dot:
            if head not in SECTIONS:
                raise ConfigError(
                    f"{where}: unknown section {head!r}; sections: {', '.join(SECTIONS)}"
                )
            sections[head][rest.replace("-", "_")] = value
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{key}' must be a table of options")
            sections[key].update(value)
        else:
            top[key.replace("-", "_")] = value

    for key, value in (read_file(file) if file else {}).items():
        put(key, value, file)
    for item in overrides or []:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --key=value")
        put(key, value, f"override {item!r}")
    for key in top:
        if key not in {f.name for f in dataclasses.fields(PipelineOptions)} - set(SECTIONS):
            raise ConfigError(f"unknown pipeline option '{key}'")
    top.update({k: v for k, v in values.items() if v is not None})  # keyword values win
    opts = build(PipelineOptions, None, None, **top)
    for s in SECTIONS:
        getattr(opts, s).update(sections[s])
    return opts


def stage_options(cls: type, section: str, wired: dict[str, Any], *layers: dict[str, Any]):
    """cls from the pipeline's defaults and the user's section layers (checked and coerced by
    `options.build`), with the `wired` fields - the stage's inputs and outputs - on top."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer)
    clash = sorted(set(values) & set(wired))
    if clash:
        raise ConfigError(
            f"option '{section}.{clash[0]}' is set by the pipeline (it wires the stages "
            "together) and cannot be overridden"
        )
    try:
        opts = build(cls, None, [f"{k}={v}" for k, v in values.items() if isinstance(v, str)],
                     **{k: v for k, v in values.items() if not isinstance(v, str)})  # fmt: skip
    except ConfigError as e:
        raise ConfigError(f"section '{section}': {e}") from None
    return dataclasses.replace(opts, **{k: v for k, v in wired.items() if hasattr(opts, k)})


# ------------------------------------------------------------------------------ stage runners
@dataclass
class Runners:
    """What the stages call; tests swap in stubs. Each trainer writes OUT/model and returns its
    final metrics; `evaluate(model_dir, **kwargs)` returns an evaluation dict (evaluate.py)."""

    sft: Callable[..., dict] | None = None  # (SFTOptions, resume, progress)
    grpo: Callable[..., dict] | None = None  # (GRPOOptions, resume, progress)
    rejection: Callable[..., dict] | None = None  # (RejectionOptions, progress)
    evaluate: Callable[..., dict] | None = None  # (model_dir, task, **settings)

    def resolved(self) -> Runners:
        def sft(opts, resume, progress):
            return run_sft(opts, resume=resume, progress=progress)

        def grpo(opts, resume, progress):
            return run_grpo(opts, resume=resume, progress=progress)

        def rejection(opts, progress):
            return run_rejection(opts, progress=progress)

        return Runners(
            self.sft or sft,
            self.grpo or grpo,
            self.rejection or rejection,
            self.evaluate or evaluate_checkpoint,
        )


def grpo_options_class():
    return GRPOOptions


# R1-Zero: rule rewards only; R1's reasoning RL adds language consistency [R1 §2.3.2]
R1_ZERO_REWARDS = {"accuracy": 1.0, "format": 0.1}
R1_REWARDS = {"accuracy": 1.0, "format": 0.1, "language": 0.1}


@dataclass
class Stage:
    name: str
    template: str  # the prompt format it is evaluated in
    run: Callable[[str, bool], tuple[str, dict]]  # (stage dir, progress) -> (model dir, metrics)


class Pipeline:
    def __init__(self, kind: str, opts: PipelineOptions, runners: Runners | None = None,
                 grpo_options: type | None = None):  # fmt: skip
        if kind not in KINDS:
            raise ConfigError(f"unknown pipeline {kind!r}; valid pipelines: {', '.join(KINDS)}")
        opts.validate()
        self.kind, self.opts = kind, opts
        self.runners = (runners or Runners()).resolved()
        self.eval_target = opts.evaluated()  # resolved once: a file is read once
        self._grpo_cls = grpo_options
        self.stages = self._plan()

    # ---------------------------------------------------------------- stage definitions
    def _plan(self) -> list[Stage]:
        o = self.opts
        base = Stage("base", o.base_template, lambda d, p: (o.model, {}))
        if self.kind == "r1-zero":
            rl = Stage("rl", o.base_template, lambda d, p: self._grpo(
                d, p, o.model, o.base_template, R1_ZERO_REWARDS, "grpo", o.grpo))  # fmt: skip
            return [base, rl]
        # the base in the tuned stages' format too, so every later row has a like-for-like row
        # before it (a base rarely knows a chat format it was never trained on)
        same = o.template == o.base_template
        base_tuned = [] if same else [Stage(f"base_{o.template}", o.template, base.run)]
        return [
            base,
            *base_tuned,
            Stage("cold_start", o.template, self._cold_start),
            Stage("reasoning_rl", o.template, lambda d, p: self._grpo(
                d, p, self.model_of("cold_start"), o.template, R1_REWARDS, "grpo", o.grpo)),
            Stage("rejection_sft", o.template, self._rejection_sft),
            Stage("final_rl", o.template, lambda d, p: self._grpo(
                d, p, self.model_of("rejection_sft"), o.template, R1_REWARDS, "final_grpo",
                o.grpo, o.final_grpo)),
        ]  # fmt: skip

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.opts.out, name)

    def model_of(self, name: str) -> str:
        """The model directory a finished stage left behind."""
        done = read_done(self.stage_dir(name))
        assert done is not None, f"stage {name} has not finished"
        return done["model"]

    def _cold_start(self, d: str, progress: bool) -> tuple[str, dict]:
        o = self.opts
        defaults = {"task_n": o.cold_start_n, "seed": o.seed}
        if o.cold_start_data:
            wired = {"model": o.model, "out": d, "data": [o.cold_start_data], "task": None}
        else:
            task = o.cold_start_task or o.task
            wired = {"model": o.model, "out": d, "task": task, "task_level": o.level,
                     "task_holdout": o.holdout(task)}  # fmt: skip
        sft = stage_options(SFTOptions, "sft", wired, defaults, o.sft)
        metrics = self.runners.sft(sft, True, progress)
        return os.path.join(d, "model"), metrics

    def _rejection_sft(self, d: str, progress: bool) -> tuple[str, dict]:
        o = self.opts
        samples = os.path.join(d, "samples.jsonl")
        wired = {"model": self.model_of("reasoning_rl"), "task": o.task, "out": samples,
                 "level": o.level, "template": o.template,
                 "task_holdout": o.holdout(o.task)}  # fmt: skip
        rs = stage_options(RejectionOptions, "rejection", wired, {"seed": o.seed}, o.rejection)
        if not os.path.exists(stats_path(samples)):  # written last: the sampling finished
            self.runners.rejection(rs, progress)
        with open(stats_path(samples)) as f:
            stats = json.load(f)
        if not stats["kept"]:
            os.remove(stats_path(samples))  # a re-run (e.g. with more samples) samples again
            raise ValueError(
                f"rejection sampling kept none of {stats['samples']} samples from "
                f"{rs.model} ({json.dumps({k: stats[k] for k in ('wrong', 'truncated')})}): "
                "train the reasoning RL stage longer, or raise rejection.samples / "
                "rejection.max_new_tokens"
            )
        # SFT of the BASE model [R1 §2.3.3]: the RL checkpoint only supplies the data
        user = {**o.sft, **o.rejection_sft}
        extra = user.pop("data", [])
        extra = [x for x in extra.split(",") if x] if isinstance(extra, str) else list(extra)
        wired = {"model": o.model, "out": d, "data": [samples, *extra], "task": None}
        sft = stage_options(SFTOptions, "rejection_sft", wired, {"epochs": 2.0, "seed": o.seed},
                            user)  # fmt: skip
        metrics = self.runners.sft(sft, True, progress)
        keys = ("prompts", "samples", "verified", "kept", "acceptance_rate")
        return os.path.join(d, "model"), {**metrics, "rejection": {k: stats[k] for k in keys}}

    def _grpo(self, d, progress, model, template, rewards, section, *layers):
        o = self.opts
        cls = self._grpo_cls or grpo_options_class()
        names = {f.name for f in dataclasses.fields(cls)}
        defaults = {"rewards": dict(rewards), "seed": o.seed}
        # GRPOOptions.task is a list (a task mix); the pipeline trains on its one task. Without
        # an `eval_task` option GRPO keeps a task file's hash split (its own held-out
        # evaluation draws from the same file), which trains on none of a separate eval_task.
        wired = {"model": model, "out": d, "task": [o.task], "task_level": o.level,
                 "template": template,
                 "eval_task": o.eval_task if o.separate_eval() else None}  # fmt: skip
        wired = {k: v for k, v in wired.items() if k in names}
        grpo = stage_options(cls, section, wired, defaults, *layers)
        metrics = self.runners.grpo(grpo, True, progress)
        return os.path.join(d, "model"), metrics

    # ---------------------------------------------------------------- running
    def evaluate(self, model_dir: str, template: str) -> dict:
        o = self.opts
        return self.runners.evaluate(
            model_dir, self.eval_target, n_problems=o.eval_n, k=o.eval_k, temperature=o.eval_temperature,
            max_new_tokens=o.eval_max_new_tokens, template=template, seed=o.seed, level=o.level,
        )  # fmt: skip

    def run(self, progress: bool = True) -> dict:
        """Run (or skip) every stage in order; returns the summary (also written to OUT)."""
        os.makedirs(self.opts.out, exist_ok=True)
        write_json(os.path.join(self.opts.out, "pipeline.json"),
                    {"kind": self.kind, "options": dataclasses.asdict(self.opts)})  # fmt: skip
        for stage in self.stages:
            d = self.stage_dir(stage.name)
            if read_done(d) is not None:
                _say(f"stage {stage.name}: done, skipped (remove {d}/{DONE} to rerun it)")
                continue
            resumed = os.path.isdir(d) and bool(os.listdir(d))
            os.makedirs(d, exist_ok=True)
            _say(f"stage {stage.name}: " + ("resuming" if resumed else "starting"))
            t0 = time.perf_counter()
            model_dir, metrics = stage.run(d, progress)
            t1 = time.perf_counter()
            ev = self.evaluate(model_dir, stage.template)
            t2 = time.perf_counter()
            done = {
                "stage": stage.name,
                "model": model_dir,
                "template": stage.template,
                "metrics": metrics,
                "eval": ev,
                "train_s": t1 - t0,
                "eval_s": t2 - t1,
                "wall_s": t2 - t0,
                "resumed": resumed,
            }
            write_json(os.path.join(d, DONE), done)  # last: marks the stage complete
            _say(f"stage {stage.name}: held-out pass@1 {ev['accuracy']:.1%}, "
                 f"format {ev['format_rate']:.1%}, {t2 - t0:.0f} s")  # fmt: skip
        return self.summary()

    def summary(self) -> dict:
        rows = []
        for stage in self.stages:
            done = read_done(self.stage_dir(stage.name))
            if done is None:
                continue
            ev = done["eval"]
            rows.append({
                "stage": stage.name,
                "template": done.get("template", stage.template),
                "pass@1": ev["accuracy"],
                f"pass@{ev['k']}": ev["pass@k"],
                "format_rate": ev["format_rate"],
                "mean_length": ev["mean_length"],
                "truncated": ev["truncated"],
                **({"n_problems": ev["n_problems"]} if "n_problems" in ev else {}),
                "wall_s": done["wall_s"],
                "model": done["model"],
                **({"rejection": done["metrics"]["rejection"]}
                   if "rejection" in (done.get("metrics") or {}) else {}),
            })  # fmt: skip
        o = self.opts
        n_eval = next((r["n_problems"] for r in rows if "n_problems" in r), o.eval_n)
        if not n_eval and not isinstance(self.eval_target, str):  # eval_n = 0: the whole file
            n_eval = self.eval_target.count("test", o.level)
        summary = {
            "kind": self.kind,
            "task": o.task,
            "eval_task": o.eval_task if o.separate_eval() else o.task,
            "level": o.level,
            "eval": {"n_problems": n_eval, "k": o.eval_k, "split": "test"},
            "stages": rows,
        }
        table = format_table(summary)
        write_json(os.path.join(o.out, "summary.json"), summary)
        write_text(os.path.join(o.out, "summary.md"), table + "\n")  # atomic
        print(table)
        return summary


def format_table(summary: dict) -> str:
    """The stage table as Markdown."""
    k = summary["eval"]["k"]
    level = "all levels" if summary["level"] is None else f"level {summary['level']}"
    evaluated = summary.get("eval_task") or summary["task"]
    on = summary["task"] if evaluated == summary["task"] else f"{summary['task']} -> {evaluated}"
    lines = [
        f"{summary['kind']} pipeline on {on} ({level}), held-out test split: "
        f"{summary['eval']['n_problems']} problems x {k} samples",
        "",
        f"| stage | template | pass@1 | pass@{k} | format | mean length | truncated | wall time |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["stages"]:
        lines.append(
            f"| {r['stage']} | {r['template']} | {r['pass@1']:.1%} | {r[f'pass@{k}']:.1%} "
            f"| {r['format_rate']:.1%} "
            f"| {r['mean_length']:.0f} | {r['truncated']:.0%} | {duration(r['wall_s'])} |"
        )
    for r in summary["stages"]:
        if "rejection" in r:
            rs = r["rejection"]
            lines.append(
                f"\n{r['stage']}: rejection sampling kept {rs['kept']} of {rs['samples']} samples "
                f"({rs['acceptance_rate']:.1%}) from {rs['prompts']} train prompts"
            )
    return "\n".join(lines)


def run_pipeline(kind: str, opts: PipelineOptions, runners: Runners | None = None,
                 progress: bool = True) -> dict:  # fmt: skip
    """Run the `kind` pipeline ("r1-zero" or "r1"); returns the summary."""
    return Pipeline(kind, opts, runners).run(progress=progress)


# ------------------------------------------------------------------------------ helpers
def read_done(stage_dir: str) -> dict | None:
    path = os.path.join(stage_dir, DONE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    """Atomically (temporary file, then rename): a DONE file is complete or absent."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _say(msg: str) -> None:
    print(f"pipeline: {msg}", file=sys.stderr, flush=True)
