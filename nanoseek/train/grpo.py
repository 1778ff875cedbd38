"""GRPO [R1 §2.2; DeepSeekMath §4.1]: reinforcement learning with rule-based rewards, on the shared loop.

    nanoseek grpo --model runs/tiny/model --task addition --out runs/grpo --task_level=2
    nanoseek grpo --model M --task countdown --out R --num_generations=16 --beta=0.001
    nanoseek grpo --model M --task my_problems.jsonl --out R --template=r1zero --resume
    nanoseek grpo --model M --task countdown --out R --algorithm=dapo   # or dr_grpo

`--algorithm` (default grpo) configures the pieces of steps 3-4 (nanoseek/train/rl/, docs/rl.md):
advantage baseline and scale, policy loss, loss normalisation, group filters, dynamic sampling.

Each step:
1. rollouts: `prompts_per_step` training problems, `num_generations` (G) samples each from the
   inference engine (the only place that generates tokens) at `temperature`/`top_p`,
   stopping at eos or `max_completion_length` (then "truncated");
2. rewards: the named rule rewards (nanoseek/tasks/rewards.py), weighted and summed; a reward that
   raises counts 0 and is reported, never fatal;
3. advantages per group; groups whose G rewards are all equal carry no signal and are dropped
   (DAPO) unless `drop_zero_std=false`;
4. `num_iterations` optimizer steps on the same rollouts, each one `Trainer.train_step` of the
   loop (micro-batches of `batch_size` completions, clipping, NaN check) on the clipped surrogate
   minus beta x k3 KL to the frozen initial model (no copy is made when beta = 0). With more than
   one iteration the old log-probs are computed once, before the first update, and kept.

Log-probs come from the main head only (MTP modules are skipped) and are recomputed with the
training forward, not taken from the engine: the engine's kernels (absorbed attention, sparse
MoE) round differently, and a ratio built from two code paths is not 1 even on-policy.
`rollout_logprob_diff` (mean |training - engine| log-prob) shows that gap. The routing bias stays
frozen (no bias updates after pre-training). Default precision is fp32: bf16 rounding alone moves
the ratio by ~1e-2, which the clip then treats as policy change.

The template must be the one the model was trained on: "short" for the built-in pre-training
corpus (its documents are `User: q\\nAssistant: <think>...`, nanoseek/data/corpus.py), "r1zero"
for a corpus made with the full instruction, "chat" for a model fine-tuned with `nanoseek sft`
(the tokenizer's chat template). A mismatch shows as a format reward stuck at 0, which is warned
about, as are completions that are all truncated and steps where no group has any signal.

Outputs in OUT: metrics.jsonl (TRL's names: reward, reward_std, frac_reward_zero_std,
rewards/<name>/mean, completions/mean_length, completions/clipped_ratio, clip_ratio, kl,
entropy, eval_accuracy ...), completions.jsonl (a few samples per step), reward.png,
checkpoints/step-N (exact resume: weights, optimizer, step, RNG, prompt position), model/.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from nanoseek.analysis.plots import plot_curves, read_metrics
from nanoseek.checkpoint.io import CheckpointError
from nanoseek.checkpoint.trainer_state import rng_state, set_rng_state
from nanoseek.config import ConfigError
from nanoseek.dist.checkpoint import export_hf
from nanoseek.dist.parallel import launch
from nanoseek.eval.evaluate import heldout_across
from nanoseek.eval.sampling import template_names
from nanoseek.tasks.resolve import resolve_task, same_file
from nanoseek.tasks.rewards import rewards_from_spec
from nanoseek.train.grpo_rollouts import PromptSampler, Rollouts, evaluate_heldout
from nanoseek.train.loop import LoopOptions, Trainer, truncate_jsonl
from nanoseek.train.options import to_dict
from nanoseek.train.rl.algorithms import ALGORITHMS, RLConfig, resolve
from nanoseek.train.rl.batches import IGNORE, fill_logprobs, make_batches  # noqa: F401
from nanoseek.train.rl.step import grpo_step, make_loss_fn
from nanoseek.train.rl.watch import Watch
from nanoseek.train.run_dir import claim_out_dir
from nanoseek.train.run_setup import load_for_training, routed_experts, write_run_files


@dataclass
class GRPOOptions(LoopOptions):
    out: str = "runs/grpo"
    model: str = ""  # checkpoint directory (policy and, with beta > 0, the frozen reference)
    tokenizer: str | None = None  # tokenizer directory; None: the model directory
    task: list[str] = field(default_factory=lambda: ["countdown"])  # names or task JSONL files
    task_level: int | None = None  # None: every level of the task
    # a task file evaluated whole; the --task files are then trained on whole. None: held-out
    # problems are the hash test split of the training tasks, never trained on
    eval_task: str | None = None
    # "short" matches the built-in pre-training corpus; "r1zero" the paper's template; "chat" the
    # tokenizer's chat template (after `nanoseek sft`). The format reward depends on it.
    template: str = "short"
    prefill: bool = True  # prompt ends in "<think>" (the corpus documents continue from there)
    num_generations: int = 8  # G, completions per prompt
    prompts_per_step: int = 8  # prompts per rollout batch (P x G completions per step)
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    # the RL algorithm (nanoseek/train/rl/algorithms.py, docs/rl.md): grpo | dr_grpo | dapo. It
    # sets every option below that is None; an option given explicitly overrides it.
    algorithm: str = "grpo"
    beta: float = 0.0  # k3 KL coefficient; 0 (TRL's default): no reference model at all
    epsilon: float = 0.2  # clip range 1 - epsilon ...
    epsilon_high: float | None = None  # ... 1 + epsilon_high (DAPO's clip-higher: 0.28)
    num_iterations: int = 1  # mu: optimizer steps per rollout batch (old log-probs kept)
    baseline: str | None = None  # group_mean (GRPO) | leave_one_out (RLOO)
    scale_rewards: str | None = None  # group (GRPO) | batch | none (Dr. GRPO): advantages / std
    policy_loss: str | None = None  # clipped (GRPO) | reinforce
    loss_norm: str | None = None  # token (grpo, dapo) | sequence (the papers') | constant (Dr.)
    drop_zero_std: bool | None = None  # drop groups whose rewards are all equal (grpo, dapo)
    mask_truncated: bool | None = None  # truncated completions take no loss (dapo)
    dynamic_sampling: bool | None = None  # re-sample until P groups have a signal (dapo)
    max_extra_rounds: int | None = None  # dynamic sampling's bound on extra rounds (8)
    max_steps: int = 100  # GRPO steps (rollout batches)
    # stop after this many seconds of GRPO steps (evaluations excluded), 0: no limit; for
    # comparisons at equal compute (distillation vs RL for a small model [R1 §4.1]). The time
    # spent is logged per step (train_s), so a resumed run continues with what is left.
    max_time_s: float = 0.0
    batch_size: int = 16  # completions per forward/backward (memory knob; does not change math)
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    precision: str = "fp32"
    eval_every: int = 20  # held-out pass@1 (greedy) every N steps, before training and at the end
    eval_n: int = 100  # held-out problems per evaluation
    eval_level: int | None = None  # None: task_level
    save_every: int = 50
    log_completions: int = 4  # sample completions per step written to completions.jsonl
    warn_after: int = 10  # steps of a failure pattern before warning about it

    def validate(self) -> None:
        if not self.model or not os.path.isdir(self.model):
            raise ConfigError(f"option 'model': {self.model!r} is not a checkpoint directory")
        templates = template_names()
        positive = ("prompts_per_step", "max_completion_length", "num_iterations", "batch_size",
                    "max_steps", "eval_n")  # fmt: skip
        checks = [(getattr(self, n) >= 1, f"option '{n}' must be >= 1") for n in positive] + [
            (bool(self.task), "no task: give --task NAME (or a task JSONL file)"),
            (self.template in templates, f"option 'template' must be one of {templates}"),
            (self.num_generations >= 2, "option 'num_generations' must be >= 2: advantages "
             "compare the completions of one prompt"),
            (self.temperature > 0, "option 'temperature' must be > 0: greedy rollouts make all "
             "G completions alike (no advantage signal)"),
            (0 < self.top_p <= 1, "option 'top_p' must be in (0, 1]"),
            (self.beta >= 0, "option 'beta' must be >= 0"),
            (self.max_time_s >= 0, "option 'max_time_s' must be >= 0 (0: no limit)"),
            (bool(self.rewards), "option 'rewards' names no reward"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"option 'algorithm' must be one of {ALGORITHMS.names()}")
        try:
            self.rl()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.eval_task:
            resolve_task(self.eval_task, split="test")  # a bad name or file fails now
        for t in self.task:
            task = resolve_task(t)  # unknown names fail now, listing the valid ones
            for name in ("task_level", "eval_level"):
                level = getattr(self, name)
                if level is not None and level not in task.levels:
                    raise ConfigError(f"option '{name}': task {task.name!r} has no level "
                                      f"{level}; valid levels: {list(task.levels)}")  # fmt: skip
        try:
            rewards_from_spec(self.rewards)
        except ValueError as e:
            raise ConfigError(f"option 'rewards': {e}") from None

    def rl(self) -> RLConfig:
        """The algorithm's settings with the options given explicitly on top."""
        return resolve(self.algorithm, self)


# ------------------------------------------------------------------------------ the run
def run_grpo(opts: GRPOOptions, resume: bool = False, progress: bool = True) -> dict:
    """Train `opts.model` with GRPO, export OUT/model; returns the last step's metrics (plus
    `eval_accuracy_initial` when the run evaluated before its first step).

    Under torchrun every rank calls this: the policy is sharded as in pre-training, every rank
    keeps a full replica for generation (`Rollouts`) and a full frozen reference (beta > 0),
    generates its share of the completions, scores all of them, and trains on its share of the
    micro-batches (`batch_size` is then global); rank 0 writes logs and the model."""
    opts.validate()
    with launch(opts, routed_experts(opts.model)) as par:
        return _run_grpo(opts, par, resume, progress)


def _run_grpo(opts: GRPOOptions, par, resume: bool, progress: bool) -> dict:
    os.makedirs(opts.out, exist_ok=True)
    torch.manual_seed(opts.seed)
    tok_src, tokenizer, model = load_for_training(opts.model, opts.tokenizer)
    # beta = 0: no reference copy at all (memory of a second model saved)
    ref = frozen_copy(model).to(par.device) if opts.beta != 0 else None
    replica = frozen_copy(model).to(par.device) if par.distributed else None
    # a separate evaluation file: train on the task files whole, evaluate on that file whole
    apart = bool(opts.eval_task) and not any(same_file(t, opts.eval_task) for t in opts.task)
    tasks = [resolve_task(t, split="train" if apart else None) for t in opts.task]
    eval_tasks = [resolve_task(opts.eval_task, split="test")] if apart else tasks
    sampler = PromptSampler(tasks, opts.seed, opts.task_level)
    watch = Watch(opts.warn_after)
    level = opts.eval_level if opts.eval_level is not None else opts.task_level
    eval_problems = (
        heldout_across(eval_tasks, opts.eval_n, opts.seed, level) if opts.eval_every else []
    )

    if par.distributed and opts.max_time_s:
        raise ConfigError("option 'max_time_s' works in one process only (ranks would disagree "
                          "on when to stop): use max_steps under torchrun")  # fmt: skip
    # after the checks of model and tasks: a failing new run leaves the previous one in place
    claim_out_dir(opts.out, resume, opts.overwrite, par)
    tok_files = write_run_files(par, opts, tok_src)
    mu = opts.num_iterations
    # the loop's schedule counts optimizer steps: mu per GRPO step
    loop_opts = dataclasses.replace(
        opts, max_steps=opts.max_steps * mu, warmup_steps=opts.warmup_steps * mu
    )
    model = par.parallelize(model, opts.precision)
    # completions change the micro-batch shapes every step: `compile` traces symbolic shapes
    trainer = Trainer(model, loop_opts, make_loss_fn(opts), None, extra_files=tok_files,
                      run_info=to_dict(opts), parallel=par, varying_shapes=True)  # fmt: skip
    rows = opts.prompts_per_step * opts.num_generations
    rollouts = Rollouts(replica or model, tokenizer.stop_ids, rows, par)
    step, train_s = 0, 0.0
    if resume:
        step = _resume(opts.out, trainer, sampler, watch)
        train_s = _logged_train_s(opts.out, step)
        rollouts.sync(model)
        if step and par.is_main:
            print(f"resumed from step {step} in {opts.out}", file=sys.stderr)
    main = par.is_main
    last: dict = {}
    bar = _bar(opts.max_steps, step) if progress and main else None
    with _logs(opts.out, main) as (log, samples_log), trainer.open_trackers() as trackers:
        if step == 0 and eval_problems:
            ev = evaluate_heldout(rollouts, tokenizer, eval_problems, opts, seed=opts.seed)
            last = {"step": 0, **{f"eval_{k}": v for k, v in ev.items()}}
            log.write(json.dumps(last) + "\n")
            log.flush()
            trackers.log(last, 0)
        while step < opts.max_steps and not (opts.max_time_s and train_s >= opts.max_time_s):
            t0 = time.perf_counter()
            m, shown = grpo_step(opts, step, model, ref, trainer, rollouts, tokenizer, sampler)
            rollouts.sync(model)
            step += 1
            train_s += time.perf_counter() - t0
            m["step"], m["train_s"] = step, train_s
            out_of_time = bool(opts.max_time_s) and train_s >= opts.max_time_s
            last_step = step == opts.max_steps or out_of_time
            if eval_problems and (step % opts.eval_every == 0 or last_step):
                ev = evaluate_heldout(rollouts, tokenizer, eval_problems, opts, seed=opts.seed)
                m.update({f"eval_{k}": v for k, v in ev.items()})
            for msg in watch.update(m, opts):
                if main:
                    warnings.warn(f"grpo step {step}: {msg}", stacklevel=2)
                m.setdefault("warnings", []).append(msg)
            log.write(json.dumps(m) + "\n")
            log.flush()
            trackers.log(m, step)
            for s in shown:
                samples_log.write(json.dumps({"step": step, **s}) + "\n")
            samples_log.flush()
            last = m
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    reward=f"{m['reward']:.3f}", len=f"{m['completions/mean_length']:.0f}"
                )
            if step % opts.save_every == 0 or last_step:
                _save(opts, step, trainer, sampler, watch)
    if bar is not None:
        bar.close()
    export_hf(model, os.path.join(opts.out, "model"), tok_files, par)
    if opts.plot and main:
        write_plots(opts.out)
    return last


@contextlib.contextmanager
def _logs(out: str, main: bool):
    """(metrics.jsonl, completions.jsonl) opened for appending on rank 0; elsewhere sinks."""
    if not main:
        yield io.StringIO(), io.StringIO()
        return
    with open(os.path.join(out, "metrics.jsonl"), "a") as log:
        with open(os.path.join(out, "completions.jsonl"), "a") as samples_log:
            yield log, samples_log


def frozen_copy(model):
    """The reference policy: a copy of the initial model without gradients (beta > 0 only)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


# ------------------------------------------------------------------------------ checkpoints
def _save(opts, step, trainer, sampler, watch) -> str:
    state = {
        "step": step,
        "optimizer_step": trainer.step,
        "data": {"sampler": sampler.state_dict(), "watch": watch.state_dict()},
        "rng": rng_state(),
        "options": to_dict(opts),
    }
    return trainer.save_state(step, state)


def _resume(out: str, trainer, sampler, watch) -> int:
    """Restore the latest checkpoint in `out`; returns its GRPO step (0: none). The frozen
    reference stays the initial model (`opts.model`), not the checkpoint."""
    state = trainer.load_latest()
    # lines written after the checkpoint are redone; without one, all of them (the step-0
    # evaluation included)
    for name in ("metrics.jsonl", "completions.jsonl") if trainer.parallel.is_main else ():
        truncate_jsonl(os.path.join(out, name), state["step"] if state else -1)
    if state is None:
        return 0
    try:
        trainer.step = state["optimizer_step"]
        sampler.load_state_dict(state["data"]["sampler"])
        watch.load_state_dict(state["data"]["watch"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{state['_path']}: GRPO trainer state is malformed ({e})") from None
    set_rng_state(state["rng"])
    return state["step"]


def _logged_train_s(out: str, step: int) -> float:
    """Seconds of GRPO steps up to `step`, from metrics.jsonl (already cut to `step`)."""
    path = os.path.join(out, "metrics.jsonl")
    if step == 0 or not os.path.isfile(path):
        return 0.0
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return next((r.get("train_s", 0.0) for r in reversed(rows) if r.get("step") == step), 0.0)


def _bar(total: int, initial: int):
    return tqdm(
        total=total, initial=initial, desc="grpo", unit="step", dynamic_ncols=True, mininterval=1.0
    )


def write_plots(out_dir: str) -> None:
    """OUT/reward.png: training rewards per step (EMA) and held-out accuracy."""
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    train = [r for r in records if "reward" in r]
    if not train:
        return
    steps = [r["step"] for r in train]
    series = {"reward (total)": (steps, [r["reward"] for r in train])}
    for k in train[-1]:
        if k.startswith("rewards/") and k.endswith("/mean"):
            series[k[8:-5]] = (steps, [r.get(k, 0.0) for r in train])  # rewards/NAME/mean
    plot_curves(series, os.path.join(out_dir, "reward.png"), "GRPO training reward (EMA)", "reward")
    ev = [r for r in records if "eval_accuracy" in r]
    if ev:
        curve = {"held-out pass@1": ([r["step"] for r in ev], [r["eval_accuracy"] for r in ev])}
        plot_curves(curve, os.path.join(out_dir, "eval_accuracy.png"), "GRPO held-out accuracy",
                    "pass@1", smooth_alpha=None)  # fmt: skip
