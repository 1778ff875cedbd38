"""`nanoseek speedrun`: the DeepSeek recipe on a laptop, each R1 finding measured, with a report card.

    nanoseek speedrun --out runs/speedrun            # ~13-15 minutes on a 2-core CPU
    nanoseek speedrun --out runs/smoke --smoke       # the same code path, a handful of steps
    nanoseek speedrun --out runs/sr --fp8 --seed=1   # FP8 pre-training, another seed

Stages (each in OUT/<stage>/, finished when OUT/<stage>/DONE exists):
    tokenizer    the built-in corpus (data/corpus.py: sums asked two ways, one mostly answered
                 without working) and the cold-start examples, a byte-level BPE
    pretrain     the preset (MLA, DeepSeekMoE with auxiliary-loss-free balancing, MTP) trained
                 on that corpus; FP8 GEMMs with --fp8 [V3 §2-3]
    fp8_vs_bf16  (--fp8 only) the same short run in BF16 and FP8: loss curves and their gap
    r1_zero      GRPO from the base with rule rewards, no SFT [R1 §2.2]
    r1           the R1 pipeline (train/pipeline.py): cold-start SFT, reasoning GRPO,
                 rejection sampling + SFT of the base, final GRPO [R1 §2.3]
    distill      logit distillation of the final model into a 2-layer student [R1 §2.4]
    student_rl   the same student trained with GRPO for the distillation's time [R1 §4.1]
    speculative  greedy decoding with and without MTP speculative decoding: tokens/s,
                 acceptance rate over the replies (each to its end), identical output
                 checked [V3 §2.2]
Every model is evaluated on held-out problems as R1 does (k samples at temperature 0.6, pass@1 =
their mean). The report card OUT/report.md + report.json (speedrun_report.py) is rewritten after
every stage; docs/recipe.md explains the task design and what each number shows.

Resuming. A re-run skips every stage with a DONE file; an interrupted stage is re-entered and
its trainer continues from its last checkpoint (checkpoints are written atomically, so a kill
at any moment leaves the previous one loadable). Options of a finished run are kept in
OUT/speedrun.json; a re-run with different options asks for a fresh OUT instead of mixing them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.analysis.plots import plot_curves, read_metrics, smooth
from nanoseek.checkpoint.io import load
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.data.corpus import write_chat_corpus, write_corpus
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer
from nanoseek.eval.evaluate import evaluate_checkpoint, heldout_problems, resolve
from nanoseek.eval.sampling import CHAT, encode_prompt
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.machine import machine_info
from nanoseek.model.transformer import CausalLM
from nanoseek.presets import PRESETS
from nanoseek.speedrun_report import write_report
from nanoseek.tasks.resolve import resolve_task
from nanoseek.train.base_choice import choose_base
from nanoseek.train.distill import DistillOptions, run_distill
from nanoseek.train.pipeline import (
    DONE,
    build_pipeline_options,
    duration,
    read_done,
    run_pipeline,
    write_json,
)
from nanoseek.train.pretrain import PretrainOptions, run_pretrain
from nanoseek.train.student import student_from_base

STAGES = (
    "tokenizer",
    "pretrain",
    "fp8_vs_bf16",
    "r1_zero",
    "r1",
    "distill",
    "student_rl",
    "speculative",
)


@dataclass
class SpeedrunOptions:
    out: str = "runs/speedrun"
    preset: str = "tiny"
    smoke: bool = False  # a handful of steps per stage: the same code path in ~1-2 minutes
    fp8: bool = False  # pre-train with FP8 GEMMs (emulated on CPU) + the FP8-vs-BF16 stage
    # the RL task: two-digit sums asked as "Find the sum of a and b." The corpus teaches the
    # skill (worked column addition) through the other phrasing, "What is a + b?", and mostly
    # states the answers of the RL phrasing without working: the base can solve the task but
    # rarely does, the situation R1-Zero's RL is for [R1 §2.2]
    task: str = "sum"
    level: int = 2
    corpus_docs: int = 30000
    corpus_tasks: dict[str, float] = field(default_factory=lambda: {"addition": 0.6, "sum": 0.4})
    corpus_levels: dict[str, float] = field(default_factory=lambda: {"1": 0.2, "2": 0.8})
    # share of a task's documents stated without the worked solution (data/corpus.py)
    corpus_direct: dict[str, float] = field(default_factory=lambda: {"sum": 0.85})
    vocab_size: int = 1024
    # long enough for the worked column addition (complete in some seeds, about half right in
    # others), short enough that the direct answers stay mostly wrong: at 1800 steps seed 0's
    # base had learnt to add two-digit numbers without working (94%), leaving RL nothing to find
    pretrain_steps: int = 1500
    # base: the newest checkpoint (second half) with train-split pass@1 <= this (base_choice.py):
    # when the direct answers become right moves with the seed (seed 0: 92% at step 1500)
    base_max_pass1: float = 0.35
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    fp8_steps: int = 150  # length of each run of the FP8-vs-BF16 comparison
    # GRPO, every RL stage (R1-Zero, reasoning RL, final RL, the student's RL)
    grpo_generations: int = 8  # G: samples per prompt
    grpo_prompts: int = 16  # prompts per step
    grpo_iterations: int = 1  # optimizer steps per rollout batch (mu)
    # 4e-4 with mu = 2 collapsed a tiny model's accuracy within 40 steps in our trials
    grpo_lr: float = 2e-4
    r1_zero_steps: int = 50
    # reasoning RL supplies the rejection-sampling data: at 40 steps seed 2's reached 58.9% and
    # the final model 86.9% (below R1-Zero's 92.5%); at 80 steps 88.8%, and the final 97.8%
    reasoning_rl_steps: int = 80
    final_rl_steps: int = 40
    max_new_tokens: int = 128  # completions of RL, rejection sampling and evaluation
    # cold-start examples: drawn like the corpus (same tasks, levels, direct share) and written
    # in the chat format, so the cold start teaches the chat template, not the RL task's habit
    cold_start_n: int = 300
    # ~8 epochs over the 300 examples carry the base's abilities into the chat template (100
    # steps left the seed-1 base at 1.8% pass@1 in it, 300 at 15.1%, about its own 11.6%)
    sft_steps: int = 300
    sft_lr: float = 1e-3  # cold start and rejection SFT
    # one sample per prompt (a correct worked sum is unique), many prompts: the SFT of the base
    # needs ~200 steps (seed 2: 800 x 2 samples, 93 steps: 7.6%; 3000 x 1, 240 steps: 73.8%)
    rejection_prompts: int = 3000
    rejection_samples: int = 1
    rejection_sft_epochs: float = 3.0
    eval_n: int = 200  # held-out problems per evaluation
    eval_k: int = 4  # samples per problem (pass@1 = their mean, at R1's temperature 0.6)
    # the student learns to copy the operands late, and where it is still learning when the
    # run ends its accuracy jumps with small changes (400 steps of 8 rows: seed 1 6.9-24%, seed 2
    # 9.6-77% at lr 1e-3-3e-3); 800 steps of 4 rows (the same examples, ~15% more time) gave
    # 99.8 / 61.1 / 81.9% in seeds 0-2 (docs/recipe.md)
    distill_steps: int = 800
    distill_examples: int = 4000  # worked solutions the student sees (and the teacher scores)
    student_layers: int = 2  # the student: the preset with this many layers
    spec_prompts: int = 8
    # the most a reply may have: decoding stops at the reply's end, as a user's does (decoded
    # past it, into text neither model was trained on, the drafts were right in 80-91% of the
    # steps against 98-99% in the replies; docs/results.md)
    spec_new_tokens: int = 96
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0: torch's default
    # compile the training forward/backward of every trainer (torch.compile,
    # nanoseek/model/compile.py); like `threads`, a resumed run may change it
    compile: bool = False

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"option 'preset': {self.preset!r}; presets: {', '.join(PRESETS)}")
        task = resolve_task(self.task)
        for t in {self.task, *self.corpus_tasks}:
            if self.level not in resolve_task(t).levels:
                raise ConfigError(f"option 'level': task {t!r} has no level {self.level}")
        for name in ("corpus_tasks", "corpus_direct"):
            for t, w in getattr(self, name).items():
                resolve_task(t)  # an unknown name fails here, listing the valid ones
                top = 1.0 if name == "corpus_direct" else float("inf")
                if not isinstance(w, int | float) or not 0 <= w <= top:
                    raise ConfigError(f"option '{name}': {t}: {w!r} is not a valid weight")
        if not any(w > 0 for w in self.corpus_tasks.values()):
            raise ConfigError("option 'corpus_tasks' must give some task a positive weight")
        self.corpus_level_weights(task.levels)
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, int) and not isinstance(value, bool) and name != "seed":
                low = {"threads": 0, "grpo_generations": 2}.get(name, 1)  # GRPO needs a group
                if value < low:
                    raise ConfigError(f"option '{name}' must be >= {low}, got {value}")
            if isinstance(value, float) and value <= 0:
                raise ConfigError(f"option '{name}' must be > 0, got {value}")
        if self.base_max_pass1 > 1:
            raise ConfigError(f"option 'base_max_pass1' must be <= 1, got {self.base_max_pass1}")
        layers = ModelConfig.from_preset(self.preset).num_hidden_layers
        if self.student_layers > layers:  # checked now, not after the other stages ran
            raise ConfigError(
                f"option 'student_layers' ({self.student_layers}) exceeds the {self.preset!r} "
                f"preset's {layers} layers"
            )

    def corpus_level_weights(self, valid: tuple[int, ...]) -> dict[int, float]:
        """`corpus_levels` as {level: weight}, checked."""
        out = {}
        for key, w in self.corpus_levels.items():
            try:
                level, w = int(key), float(w)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"option 'corpus_levels': {key!r}: {w!r} is not level: weight"
                ) from None
            if level not in valid or not w >= 0:  # `not >=` also refuses NaN
                raise ConfigError(f"option 'corpus_levels': level {key} (valid: {list(valid)}) "
                                  f"must have a weight >= 0, got {w}")  # fmt: skip
            out[level] = w
        if sum(out.values()) <= 0:
            raise ConfigError("option 'corpus_levels' must give some level a positive weight")
        return out

    def effective(self) -> SpeedrunOptions:
        """The smoke mode's budgets replace the full ones (everything else stays)."""
        if not self.smoke:
            return self
        return dataclasses.replace(
            self, corpus_docs=2000, vocab_size=512, pretrain_steps=12, fp8_steps=4,
            cold_start_n=16, sft_steps=3, reasoning_rl_steps=2, final_rl_steps=2, r1_zero_steps=2,
            rejection_prompts=6,
            rejection_samples=2, eval_n=4, eval_k=2, distill_steps=3, distill_examples=32,
            spec_prompts=1, spec_new_tokens=12, batch_size=4, seq_len=64, grpo_generations=2,
            grpo_prompts=2, max_new_tokens=32, rejection_sft_epochs=1.0,
        )  # fmt: skip


# ------------------------------------------------------------------------------ stages
@dataclass
class Context:
    opts: SpeedrunOptions  # effective (smoke budgets applied)
    progress: bool

    def dir(self, stage: str, *parts: str) -> str:
        return os.path.join(self.opts.out, stage, *parts)

    def result(self, stage: str) -> dict:
        done = read_done(self.dir(stage))
        assert done is not None, f"stage {stage} has not finished"
        return done["result"]


def stage_tokenizer(ctx: Context) -> dict:
    o = ctx.opts
    corpus = ctx.dir("tokenizer", "corpus.jsonl")
    weights = o.corpus_level_weights(resolve_task(o.task).levels)
    mix = dict(tasks=tuple(o.corpus_tasks), levels=list(weights), level_weights=weights,
               task_weights=o.corpus_tasks, direct=o.corpus_direct)  # fmt: skip
    docs = write_corpus(corpus, o.corpus_docs, seed=o.seed, **mix)
    cold_start = ctx.dir("tokenizer", "cold_start.jsonl")
    write_chat_corpus(cold_start, o.cold_start_n, seed=o.seed + 1, **mix)  # other problems
    tok = train_tokenizer([Path(corpus)], o.vocab_size, ctx.dir("tokenizer", "tokenizer"))
    return {"corpus": corpus, "documents": docs, "tokenizer": ctx.dir("tokenizer", "tokenizer"),
            "vocab_size": tok.vocab_size, "cold_start": cold_start}  # fmt: skip


def pretrain_options(ctx: Context, out: str, precision: str, steps: int, keep_last: int = 2):
    o, tok = ctx.opts, ctx.result("tokenizer")
    return PretrainOptions(
        out=out, model=o.preset, data=[tok["corpus"]], tokenizer=tok["tokenizer"],
        seq_len=o.seq_len, batch_size=o.batch_size, max_steps=steps, lr=o.lr,
        warmup_steps=min(20, max(1, steps // 10)), lr_schedule="wsd", precision=precision,
        eval_every=max(1, min(100, steps // 4)), save_every=max(1, min(100, steps // 2)),
        keep_last=keep_last, seed=o.seed, compile=o.compile and precision != "fp8",
    )  # fmt: skip


def stage_pretrain(ctx: Context) -> dict:
    o = ctx.opts
    precision = "fp8" if o.fp8 else "bf16"
    # every checkpoint kept (~6 MB of weights + 11 MB of optimizer state each): the base is
    # chosen among them
    opts = pretrain_options(ctx, ctx.dir("pretrain"), precision, o.pretrain_steps, keep_last=0)
    last = run_pretrain(opts, resume=True, progress=ctx.progress)
    choice = choose_base(ctx.dir("pretrain"), o.task, o.level, o.base_max_pass1,
                         min_step=o.pretrain_steps // 2, max_new_tokens=o.max_new_tokens,
                         seed=o.seed, log=_say)  # fmt: skip
    records = read_metrics(ctx.dir("pretrain", "metrics.jsonl"))
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    tail = records[-max(1, len(records) // 10) :]
    return {
        "model": choice["model"],  # the base every later stage starts from
        "final_model": ctx.dir("pretrain", "model"),
        "base_choice": choice,
        "steps": o.pretrain_steps,
        "precision": opts.precision,
        "val_loss": val,
        "train_loss_end": sum(r["main_loss"] for r in tail) / len(tail),
        "maxvio_global_end": sum(r["maxvio_global"] for r in tail) / len(tail),
        "tokens_per_s": sorted(r["tokens_per_s"] for r in records)[len(records) // 2],
        "options": dataclasses.asdict(opts),
        "final": {k: v for k, v in last.items() if isinstance(v, int | float)},
    }


def stage_fp8_vs_bf16(ctx: Context) -> dict:
    o, runs = ctx.opts, {}
    for precision in ("bf16", "fp8"):
        out = ctx.dir("fp8_vs_bf16", precision)
        run_pretrain(pretrain_options(ctx, out, precision, o.fp8_steps), resume=True,
                     progress=ctx.progress)  # fmt: skip
        runs[precision] = read_metrics(os.path.join(out, "metrics.jsonl"))
    loss = {k: [r["main_loss"] for r in v] for k, v in runs.items()}
    final = {k: smooth(v, 0.05)[-1] for k, v in loss.items()}
    speed = {k: sorted(r["tokens_per_s"] for r in v)[len(v) // 2] for k, v in runs.items()}
    plot = ctx.dir("fp8_vs_bf16", "fp8_vs_bf16.png")
    plot_curves({k: (list(range(1, len(v) + 1)), v) for k, v in loss.items()}, plot,
                "training loss, BF16 vs FP8 (1x128 / 128x128 scaling)", "loss")  # fmt: skip
    return {
        "steps": o.fp8_steps,
        "final_loss": final,
        "rel_diff": abs(final["fp8"] - final["bf16"]) / final["bf16"],
        "tokens_per_s": speed,
        "plot": plot,
    }


def grpo_overrides(o: SpeedrunOptions, section: str, steps: int) -> list[str]:
    """GRPO settings of one pipeline section, shared by every RL stage of the main job."""
    return [
        f"--{section}.max_steps={steps}", f"--{section}.num_generations={o.grpo_generations}",
        f"--{section}.prompts_per_step={o.grpo_prompts}",
        f"--{section}.max_completion_length={o.max_new_tokens}", f"--{section}.batch_size=64",
        f"--{section}.lr={o.grpo_lr}", f"--{section}.num_iterations={o.grpo_iterations}",
        f"--{section}.warmup_steps={min(5, steps)}",
        f"--{section}.eval_every={max(1, steps // 2)}", f"--{section}.eval_n={min(100, o.eval_n)}",
        f"--{section}.save_every={max(1, steps // 4)}", f"--{section}.compile={o.compile}",
    ]  # fmt: skip


def pipeline_options(ctx: Context, stage: str, overrides: list[str], **values):
    o = ctx.opts
    return build_pipeline_options(
        None, overrides, model=ctx.result("pretrain")["model"], task=o.task, level=o.level,
        out=ctx.dir(stage), eval_n=o.eval_n, eval_k=o.eval_k, eval_max_new_tokens=o.max_new_tokens,
        seed=o.seed, **values,
    )  # fmt: skip


def stage_r1_zero(ctx: Context) -> dict:
    """GRPO straight from the base, rule rewards only, no SFT [R1 §2.2]."""
    o = ctx.opts
    opts = pipeline_options(ctx, "r1_zero", grpo_overrides(o, "grpo", o.r1_zero_steps))
    summary = run_pipeline("r1-zero", opts, progress=ctx.progress)
    return {"summary": summary, "model": summary["stages"][-1]["model"],
            "options": dataclasses.asdict(opts)}  # fmt: skip


def stage_r1(ctx: Context) -> dict:
    o = ctx.opts
    overrides = [
        # the cold start [R1 §2.3.1]: a few hundred examples in the chat format (the tokenizer
        # stage's cold_start.jsonl), enough to teach the format, not the RL task's habit
        f"--sft.max_steps={o.sft_steps}", "--sft.batch_size=8", f"--sft.seq_len={o.seq_len * 2}",
        f"--sft.lr={o.sft_lr}", f"--sft.eval_every={max(1, o.sft_steps // 3)}",
        f"--sft.save_every={max(1, o.sft_steps // 3)}",
        *grpo_overrides(o, "grpo", o.reasoning_rl_steps),
        *grpo_overrides(o, "final_grpo", o.final_rl_steps),
        f"--rejection.n_prompts={o.rejection_prompts}",
        f"--rejection.samples={o.rejection_samples}", "--rejection.temperature=1.0",  # diverse samples: duplicates are dropped
        f"--rejection.max_new_tokens={o.max_new_tokens}",
        # R1 fine-tunes two epochs over ~800k samples [§2.3.3]; over a few thousand, more
        # epochs give the base about the cold start's number of steps
        f"--rejection_sft.epochs={o.rejection_sft_epochs}",
        f"--sft.compile={o.compile}", f"--rejection_sft.compile={o.compile}",
    ]  # fmt: skip
    if o.smoke:  # an untrained model rarely gets one right: keep its samples to run the path
        overrides.append("--rejection.keep_unverified=true")
    opts = pipeline_options(ctx, "r1", overrides,
                            cold_start_data=ctx.result("tokenizer")["cold_start"])  # fmt: skip
    summary = run_pipeline("r1", opts, progress=ctx.progress)
    rows = summary["stages"]
    return {"summary": summary, "final_model": rows[-1]["model"], "options":
            dataclasses.asdict(opts)}  # fmt: skip


def stage_distill(ctx: Context) -> dict:
    o = ctx.opts
    teacher = ctx.result("r1")["final_model"]
    base = ctx.result("pretrain")["model"]
    student_init = ctx.dir("distill", "student_init")
    if not os.path.isfile(os.path.join(student_init, "config.json")):
        student_from_base(base, o.student_layers, student_init)
    init_eval = evaluate_checkpoint(student_init, o.task, n_problems=o.eval_n, k=o.eval_k,
                                    template=CHAT, max_new_tokens=o.max_new_tokens, seed=o.seed,
                                    level=o.level)  # fmt: skip
    opts = DistillOptions(
        out=ctx.dir("distill"), teacher=teacher, student=student_init, loss="forward_kl",
        task=o.task, task_level=o.level, task_n=o.distill_examples, task_holdout=True,
        seq_len=o.seq_len * 2,
        # 4 rows of the default 16: more, smaller steps over the same examples (distill_steps)
        batch_size=max(1, o.batch_size // 4), max_steps=o.distill_steps, lr=1e-3,
        lr_schedule="wsd", warmup_steps=min(20, max(1, o.distill_steps // 10)),
        eval_every=max(1, o.distill_steps // 4), save_every=max(1, o.distill_steps // 2),
        seed=o.seed, compile=o.compile,
    )  # fmt: skip
    run_distill(opts, resume=True, progress=ctx.progress)
    model_dir = ctx.dir("distill", "model")
    ev = evaluate_checkpoint(model_dir, o.task, n_problems=o.eval_n, k=o.eval_k, template=CHAT,
                             max_new_tokens=o.max_new_tokens, seed=o.seed, level=o.level)  # fmt: skip
    records = read_metrics(ctx.dir("distill", "metrics.jsonl"))
    val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    # time of the training steps (evaluations excluded), the student RL stage's budget
    train_s = sum(r.get("step_time_s", 0.0) for r in records)
    with open(ctx.dir("distill", "teacher_eval.json")) as f:
        teacher_val = json.load(f).get("teacher_val_loss")
    keys = ("accuracy", "pass@k", "k", "format_rate", "mean_length")
    return {
        "model": model_dir,
        "student_init": student_init,
        "teacher": teacher,
        "student_params": _n_params(ModelConfig.from_pretrained(model_dir)),
        "teacher_params": _n_params(ModelConfig.from_pretrained(teacher)),
        "student_layers": o.student_layers,
        "val_loss": val[-1] if val else None,
        "teacher_val_loss": teacher_val,
        "init_eval": {k: init_eval[k] for k in keys},
        "eval": {k: ev[k] for k in keys},
        "train_s": train_s,
        "options": dataclasses.asdict(opts),
    }


def stage_student_rl(ctx: Context) -> dict:
    """The distillation stage's student init trained with GRPO instead, for the wall time the
    distillation took: R1 §4.1's question (distil a small model, or RL it?) at equal compute.
    RL runs in the base's own prompt format, as R1-Zero does."""
    o = ctx.opts
    budget = ctx.result("distill")["train_s"]
    # max_steps only bounds the run: the time budget stops it, and evaluates the last step
    overrides = [*grpo_overrides(o, "grpo", 10_000), f"--grpo.max_time_s={budget:.1f}"]
    opts = pipeline_options(ctx, "student_rl", overrides)
    opts.model = ctx.result("distill")["student_init"]
    summary = run_pipeline("r1-zero", opts, progress=ctx.progress)
    rows = summary["stages"]
    logged = read_metrics(ctx.dir("student_rl", "rl", "metrics.jsonl"))
    steps = [r for r in logged if "train_s" in r]
    return {"summary": summary, "model": rows[-1]["model"], "budget_s": budget,
            "train_s": steps[-1]["train_s"] if steps else 0.0,
            "steps": steps[-1]["step"] if steps else 0,
            "eval": {k: rows[-1][k] for k in ("pass@1", "format_rate", "mean_length")}}  # fmt: skip


def stage_speculative(ctx: Context) -> dict:
    o = ctx.opts
    model_dir = ctx.result("r1")["final_model"]
    model, tok = load(model_dir, dtype=torch.float32), Tokenizer.load(model_dir)
    problems = heldout_problems(resolve(o.task), o.spec_prompts, seed=o.seed + 1, level=o.level)
    prompts = [encode_prompt(tok, p, CHAT) for p in problems]
    params = SamplingParams(max_new_tokens=o.spec_new_tokens)
    max_len = max(map(len, prompts)) + o.spec_new_tokens + 4
    runs = {}
    for name, spec in (("plain", None), ("mtp", "mtp")):
        engine = Engine(model, tok, max_batch_size=1, max_seq_len=max_len, speculative=spec)
        engine.generate([prompts[0]], params)  # warm-up
        if engine.speculator is not None:
            engine.speculator.reset_stats()
        t0, outs = time.perf_counter(), []
        for p in prompts:  # batch 1: the latency case speculative decoding is for
            outs.append(engine.generate([p], params)[0].token_ids)
        dt = time.perf_counter() - t0
        runs[name] = {"tokens": outs, "s": dt, "tokens_per_s": sum(map(len, outs)) / dt}
        if engine.speculator is not None:
            runs[name]["acceptance"] = engine.speculator.acceptance_rates()
            runs[name]["tokens_per_step"] = engine.speculator.tokens_per_step()
    same = runs["plain"]["tokens"] == runs["mtp"]["tokens"]
    return {
        "prompts": len(prompts),
        "new_tokens": o.spec_new_tokens,
        "reply_tokens": sum(map(len, runs["plain"]["tokens"])) / len(prompts),  # mean
        "threads": torch.get_num_threads(),
        "plain_tokens_per_s": runs["plain"]["tokens_per_s"],
        "mtp_tokens_per_s": runs["mtp"]["tokens_per_s"],
        "speedup": runs["mtp"]["tokens_per_s"] / runs["plain"]["tokens_per_s"],
        "acceptance": runs["mtp"]["acceptance"],
        "tokens_per_step": runs["mtp"]["tokens_per_step"],
        "greedy_identical": same,
        "sample": tok.decode(runs["plain"]["tokens"][0]),
    }


def _n_params(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in CausalLM(cfg).parameters())


RUNNERS: dict[str, Callable[[Context], dict]] = {
    "tokenizer": stage_tokenizer,
    "pretrain": stage_pretrain,
    "fp8_vs_bf16": stage_fp8_vs_bf16,
    "r1_zero": stage_r1_zero,
    "r1": stage_r1,
    "distill": stage_distill,
    "student_rl": stage_student_rl,
    "speculative": stage_speculative,
}
# seconds per unit of work on a quiet 2-core CPU (Xeon, 2 threads, measured); only for the ETA
ESTIMATES: dict[str, Callable[[SpeedrunOptions], float]] = {
    "tokenizer": lambda o: 2 + o.corpus_docs / 30000,
    "pretrain": lambda o: o.pretrain_steps * (0.5 if o.fp8 else 0.15) + 10,
    "fp8_vs_bf16": lambda o: o.fp8_steps * 0.65 + 10,
    "r1_zero": lambda o: 10 + o.r1_zero_steps * 0.9 + 2 * o.eval_n * o.eval_k * 0.005,
    "r1": lambda o: (
        30
        + o.sft_steps * 0.15
        + (o.reasoning_rl_steps + o.final_rl_steps) * 0.9
        + o.rejection_prompts * o.rejection_samples * (0.01 + 0.004 * o.rejection_sft_epochs)
        + 6 * o.eval_n * o.eval_k * 0.005
    ),
    "distill": lambda o: 10 + o.distill_steps * 0.07 + o.eval_n * o.eval_k * 0.005,
    "student_rl": lambda o: 10 + o.distill_steps * 0.06 + 2 * o.eval_n * o.eval_k * 0.005,
    "speculative": lambda o: 3 + o.spec_prompts * o.spec_new_tokens * 0.002,
}


# ------------------------------------------------------------------------------ running
def planned_stages(opts: SpeedrunOptions) -> list[str]:
    return [s for s in STAGES if s != "fp8_vs_bf16" or opts.fp8]


def check_same_options(opts: SpeedrunOptions) -> None:
    """A re-run continues the run in OUT only with the options it started with."""
    path = os.path.join(opts.out, "speedrun.json")
    if not os.path.exists(path):
        write_json(path, {"options": dataclasses.asdict(opts)})
        return
    with open(path) as f:
        before = json.load(f)["options"]
    now = dataclasses.asdict(opts)
    # threads and compile change the speed, not what is trained
    changed = sorted(k for k in now if k not in ("threads", "compile") and before.get(k) != now[k])
    if changed:
        k = changed[0]
        raise ConfigError(
            f"{opts.out} holds a speedrun with other options ({k}: {before.get(k)!r} there, "
            f"{now[k]!r} now): use another --out, or remove {opts.out} to start over"
        )


def run_speedrun(opts: SpeedrunOptions, progress: bool = True) -> dict:
    """Run (or skip) every stage; returns the report card's data (also OUT/report.md)."""
    opts.validate()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    os.makedirs(opts.out, exist_ok=True)
    check_same_options(opts)
    ctx = Context(opts.effective(), progress)
    stages = planned_stages(opts)
    machine = machine_info()
    t_start, scale = time.perf_counter(), 1.0  # actual / estimated time of the stages run
    spent_est = spent_real = 0.0
    for i, name in enumerate(stages, 1):
        d = ctx.dir(name)
        if read_done(d) is not None:
            _say(f"[{i}/{len(stages)}] {name}: done, skipped (remove {d}/{DONE} to redo it)")
            continue
        resumed = os.path.isdir(d) and bool(os.listdir(d))
        os.makedirs(d, exist_ok=True)
        remaining = sum(
            ESTIMATES[s](ctx.opts) for s in stages[i - 1 :] if not read_done(ctx.dir(s))
        )
        est = ESTIMATES[name](ctx.opts)
        _say(f"[{i}/{len(stages)}] {name}: {'resuming' if resumed else 'starting'} "
             f"(about {duration(est * scale)}; all left: {duration(remaining * scale)})")  # fmt: skip
        t0 = time.perf_counter()
        try:
            result = RUNNERS[name](ctx)
        except BaseException:  # Ctrl-C included: the next run adds this attempt's time
            _add_partial_wall(d, time.perf_counter() - t0)
            raise
        wall = time.perf_counter() - t0 + _add_partial_wall(d, 0.0)
        write_json(os.path.join(d, DONE), {"stage": name, "result": result, "wall_s": wall,
                                            "resumed": resumed})  # fmt: skip
        spent_est, spent_real = spent_est + est, spent_real + wall
        # how much faster or slower this machine is than the estimates, damped by a prior
        # of two minutes at 1x so one short stage does not swing the whole ETA
        scale = (spent_real + 120) / (spent_est + 120)
        write_report(opts, ctx.opts, stages, machine)
        _say(f"[{i}/{len(stages)}] {name}: finished in {duration(wall)}")
    card = write_report(opts, ctx.opts, stages, machine)
    _say(f"all stages done ({duration(time.perf_counter() - t_start)} this run); "
         f"report card: {os.path.join(opts.out, 'report.md')}")  # fmt: skip
    return card


def _add_partial_wall(stage_dir: str, seconds: float) -> float:
    """Wall time of a stage's interrupted attempts (OUT/<stage>/partial_wall_s), plus `seconds`."""
    path = os.path.join(stage_dir, "partial_wall_s")
    before = 0.0
    if os.path.isfile(path):
        with open(path) as f:
            before = float(f.read() or 0)
    if seconds:
        write_json(path, before + seconds)
    return before + seconds


def _say(msg: str) -> None:
    print(f"speedrun {msg}", file=sys.stderr, flush=True)
