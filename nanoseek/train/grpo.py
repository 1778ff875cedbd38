"""GRPO [R1 §2.2; DeepSeekMath §4.1]: reinforcement learning with rule-based rewards, on the shared loop.

    nanoseek grpo --model runs/tiny/model --task addition --out runs/grpo --task_level=2
    nanoseek grpo --model M --task countdown --out R --num_generations=16 --beta=0.001
    nanoseek grpo --model M --task my_problems.jsonl --out R --template=r1zero --resume

Each step:
1. rollouts: `prompts_per_step` training problems, `num_generations` (G) samples each from the
   inference engine (the only place that generates tokens) at `temperature`/`top_p`,
   stopping at eos or `max_completion_length` (then "truncated");
2. rewards: the named rule rewards (nanoseek/tasks/rewards.py), weighted and summed; a reward that
   raises counts 0 and is reported, never fatal;
3. advantages per group (grpo_loss.py); groups whose G rewards are all equal carry no signal and
   are dropped (DAPO) unless `drop_zero_std=false`;
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
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

from nanoseek.config import ConfigError
from nanoseek.train.grpo_loss import (
    NORMS,
    SCALES,
    group_advantages,
    grpo_loss,
    masked_mean,
    token_entropy,
    token_logprobs,
)
from nanoseek.train.grpo_rollouts import (  # noqa: F401  (re-exported: grpo's public names)
    TEMPLATE_CHAT,
    PromptSampler,
    Rollouts,
    completion_ids,
    encode_prompt,
    evaluate,
    held_out,
    request_seed,
    sampling,
)
from nanoseek.train.loop import LoopOptions, Trainer, truncate_jsonl
from nanoseek.train.options import to_dict

IGNORE = -100


@dataclass
class GRPOOptions(LoopOptions):
    out: str = "runs/grpo"
    model: str = ""  # checkpoint directory (policy and, with beta > 0, the frozen reference)
    tokenizer: str | None = None  # tokenizer directory; None: the model directory
    task: list[str] = field(default_factory=lambda: ["countdown"])  # names or task JSONL files
    task_level: int | None = None  # None: every level of the task
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
    beta: float = 0.0  # k3 KL coefficient; 0 (TRL's default): no reference model at all
    epsilon: float = 0.2  # clip range 1 - epsilon ...
    epsilon_high: float | None = None  # ... 1 + epsilon_high (DAPO's clip-higher); None: epsilon
    num_iterations: int = 1  # mu: optimizer steps per rollout batch (old log-probs kept)
    scale_rewards: str = "group"  # group | batch | none: what the advantages are divided by
    loss_norm: str = "token"  # token (DAPO, TRL's default) | sequence (the paper's)
    drop_zero_std: bool = True  # DAPO: drop groups whose rewards are all equal
    mask_truncated: bool = False  # truncated completions take no loss (DAPO's overlong filter)
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
        from nanoseek.tasks import TEMPLATES
        from nanoseek.tasks.rewards import rewards_from_spec
        from nanoseek.train.sft_data import resolve_task

        if not self.model or not os.path.isdir(self.model):
            raise ConfigError(f"option 'model': {self.model!r} is not a checkpoint directory")
        templates = (*TEMPLATES, TEMPLATE_CHAT)
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
            (0 < self.epsilon < 1, "option 'epsilon' must be in (0, 1)"),
            (self.epsilon_high is None or self.epsilon_high > 0, "'epsilon_high' must be > 0"),
            (self.scale_rewards in SCALES, f"option 'scale_rewards' must be one of {SCALES}"),
            (self.loss_norm in NORMS, f"option 'loss_norm' must be one of {NORMS}"),
            (bool(self.rewards), "option 'rewards' names no reward"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
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


# ------------------------------------------------------------------------------ batches
def make_batches(rows: list[dict], pad_id: int, batch_size: int, norm: dict) -> list[dict]:
    """Completions -> right-padded micro-batches. A row: prompt ids, completion ids, advantage,
    engine log-probs. labels are the ids on completion tokens, IGNORE elsewhere (the loop counts
    them as the micro-batch's target tokens), so logits[:, t] scores labels[:, t + 1]."""
    batches = []
    for s in range(0, len(rows), batch_size):
        part = rows[s : s + batch_size]
        L = max(len(r["prompt"]) + len(r["completion"]) for r in part)
        ids = torch.full((len(part), L), pad_id, dtype=torch.long)
        labels = torch.full((len(part), L), IGNORE, dtype=torch.long)
        real = torch.zeros(len(part), L, dtype=torch.bool)
        engine_lp = torch.full((len(part), L - 1), float("nan"))
        for b, r in enumerate(part):
            p, c = len(r["prompt"]), len(r["completion"])
            ids[b, : p + c] = torch.tensor(r["prompt"] + r["completion"])
            labels[b, p : p + c] = torch.tensor(r["completion"])
            real[b, : p + c] = True
            if r["logprobs"]:
                engine_lp[b, p - 1 : p - 1 + c] = torch.tensor(r["logprobs"][:c])
        adv = torch.tensor([r["advantage"] for r in part], dtype=torch.float32)
        batches.append(dict(input_ids=ids, labels=labels, token_mask=real, advantages=adv,
                            engine_logp=engine_lp, old_logp=None, ref_logp=None, **norm))  # fmt: skip
    return batches


def rank_batches(rows: list[dict], pad_id: int, batch_size: int, norm: dict, par) -> list[dict]:
    """This rank's micro-batches of the step's rows: rows rank, rank + W, ... in micro-batches of
    batch_size / W. Every rank runs the same number of micro-batches (a sharded forward is a
    collective), so a rank whose share is one row short gets a row with no targets: the loop
    weights a micro-batch by its targets, so it adds nothing."""
    W = par.world_size
    if W == 1:
        return make_batches(rows, pad_id, batch_size, norm)
    b = batch_size // W
    mine = rows[par.rank :: W]
    batches = make_batches(mine, pad_id, b, norm) if mine else []
    most = math.ceil(math.ceil(len(rows) / W) / b)  # micro-batches of the rank with most rows
    while len(batches) < most:
        idle = make_batches(rows[:1], pad_id, 1, norm)[0]
        idle["labels"].fill_(IGNORE)
        batches.append(idle)
    return batches


@torch.no_grad()
def fill_logprobs(model, batches: list[dict], key: str, temperature: float, autocast) -> None:
    """batch[key] = the model's completion log-probs [b, L-1] (the reference's, or the old
    policy's before the first of several updates)."""
    model_was_training = model.training
    model.eval()
    for b in batches:
        with autocast():
            logits = model(b["input_ids"], mtp=False).logits[:, :-1]
        b[key] = token_logprobs(logits, b["labels"][:, 1:].clamp(min=0), temperature)
    model.train(model_was_training)


def make_loss_fn(opts: GRPOOptions):
    """(model, micro-batch, step) -> (loss, metrics) for `Trainer.train_step`. The loop weights a
    micro-batch's loss by its share of the step's target tokens, so the loss returned here is
    the micro-batch's own token mean ("token"), or its share of the sequence mean rescaled by
    total tokens / its tokens ("sequence"): either way the micro-batches add up to the batch."""

    def loss_fn(model, batch, step: int):
        out = model(batch["input_ids"], mtp=False, token_mask=batch["token_mask"])
        logits = out.logits[:, :-1]  # [b,L-1,V]: position t predicts token t+1
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        logp = token_logprobs(logits, targets.clamp(min=0), opts.temperature)
        old = batch["old_logp"] if batch["old_logp"] is not None else logp.detach()
        res = grpo_loss(logp, old, batch["advantages"], mask, ref_logp=batch["ref_logp"],
                        beta=opts.beta, epsilon=opts.epsilon, epsilon_high=opts.epsilon_high,
                        norm=opts.loss_norm, n_seqs=batch["n_seqs"])  # fmt: skip
        loss = res.loss
        if opts.loss_norm == "sequence":
            loss = loss * batch["n_tokens"] / mask.sum().clamp(min=1)
        eng = batch["engine_logp"]
        parts = {
            "clip_ratio": masked_mean(res.clipped_low | res.clipped_high, mask),
            "clip_ratio/low_mean": masked_mean(res.clipped_low, mask),
            "clip_ratio/high_mean": masked_mean(res.clipped_high, mask),
            "entropy": masked_mean(token_entropy(logits.detach(), opts.temperature), mask),
            "rollout_logprob_diff": masked_mean((logp.detach() - eng).abs().nan_to_num(), mask),
        }
        if res.kl is not None:
            parts["kl"] = masked_mean(res.kl, mask)
        if out.aux_loss is not None:  # the small balance loss stays as configured (as in SFT)
            loss = loss + out.aux_loss
            parts["aux_loss"] = out.aux_loss.item()
        return loss, parts

    return loss_fn


# ------------------------------------------------------------------------------ warnings
class Watch:
    """Counts consecutive steps of the classic GRPO failures and warns once per streak."""

    def __init__(self, warn_after: int):
        self.warn_after = warn_after
        self.streaks = {"format_zero": 0, "all_truncated": 0, "no_signal": 0}

    def update(self, m: dict, opts: GRPOOptions) -> list[str]:
        fmt = [v for k, v in m.items() if k.startswith("rewards/format") and k.endswith("/mean")]
        conditions = {
            "format_zero": bool(fmt) and max(fmt) == 0.0,
            "all_truncated": m["completions/clipped_ratio"] == 1.0,
            "no_signal": m["frac_reward_zero_std"] == 1.0,
        }
        limits = {"format_zero": self.warn_after, "all_truncated": min(3, self.warn_after),
                  "no_signal": self.warn_after}  # fmt: skip
        out = []
        for name, hit in conditions.items():
            self.streaks[name] = self.streaks[name] + 1 if hit else 0
            if self.streaks[name] == limits[name]:
                out.append(self._message(name, limits[name], m, opts))
        return out

    @staticmethod
    def _message(name: str, n: int, m: dict, opts: GRPOOptions) -> str:
        if name == "format_zero":
            return (
                f"the format reward has been 0 for {n} steps: no completion has the "
                "'<think>...</think> <answer>...</answer>' shape. Usually the prompt template "
                f"or prefill differs from what the model was trained on (template="
                f"{opts.template!r}, prefill={opts.prefill}; the built-in corpus uses 'short' with "
                "a prefilled <think>, `nanoseek sft` models use 'chat'), or the model never "
                "learnt the format: cold-start it with SFT first"
            )
        if name == "all_truncated":
            return (
                f"every completion hit max_completion_length={opts.max_completion_length} for "
                f"{n} steps: none reached its answer, so rewards are 0; raise "
                "max_completion_length (or check that the model stops at eos)"
            )
        return (
            f"no group had different rewards for {n} steps (mean reward {m['reward']:.3f}): all G "
            "completions of each prompt score the same, so every advantage is 0 and nothing is "
            "learnt. The problems are too hard (reward 0) or too easy (reward 1) for this model: "
            "change task_level, or raise num_generations"
        )

    def state_dict(self) -> dict:
        return dict(self.streaks)

    def load_state_dict(self, state: dict) -> None:
        self.streaks.update(state)


# ------------------------------------------------------------------------------ the run
def run_grpo(opts: GRPOOptions, resume: bool = False, progress: bool = True) -> dict:
    """Train `opts.model` with GRPO, export OUT/model; returns the last step's metrics (plus
    `eval_accuracy_initial` when the run evaluated before its first step).

    Under torchrun every rank calls this: the policy is sharded as in pre-training, every rank
    keeps a full replica for generation (`Rollouts`) and a full frozen reference (beta > 0),
    generates its share of the completions, scores all of them, and trains on its share of the
    micro-batches (`batch_size` is then global); rank 0 writes logs and the model."""
    from nanoseek.dist.parallel import launch
    from nanoseek.train.sft import routed_experts

    opts.validate()
    with launch(opts, routed_experts(opts.model)) as par:
        return _run_grpo(opts, par, resume, progress)


def _run_grpo(opts: GRPOOptions, par, resume: bool, progress: bool) -> dict:
    from nanoseek.dist.checkpoint import export_hf
    from nanoseek.train.run_dir import claim_out_dir
    from nanoseek.train.sft import load_for_training, write_run_files
    from nanoseek.train.sft_data import resolve_task

    os.makedirs(opts.out, exist_ok=True)
    torch.manual_seed(opts.seed)
    tok_src, tokenizer, model = load_for_training(opts.model, opts.tokenizer)
    # beta = 0: no reference copy at all (memory of a second model saved)
    ref = frozen_copy(model).to(par.device) if opts.beta != 0 else None
    replica = frozen_copy(model).to(par.device) if par.distributed else None
    tasks = [resolve_task(t) for t in opts.task]
    sampler = PromptSampler(tasks, opts.seed, opts.task_level)
    watch = Watch(opts.warn_after)
    level = opts.eval_level if opts.eval_level is not None else opts.task_level
    eval_problems = held_out(tasks, opts.eval_n, opts.seed, level) if opts.eval_every else []

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
    trainer = Trainer(model, loop_opts, make_loss_fn(opts), None, extra_files=tok_files,
                      run_info=to_dict(opts), parallel=par)  # fmt: skip
    rows = opts.prompts_per_step * opts.num_generations
    rollouts = Rollouts(replica or model, tokenizer.eos_id, rows, par)
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
    with _logs(opts.out, main) as (log, samples_log):
        if step == 0 and eval_problems:
            ev = evaluate(rollouts, tokenizer, eval_problems, opts, seed=opts.seed)
            last = {"step": 0, **{f"eval_{k}": v for k, v in ev.items()}}
            log.write(json.dumps(last) + "\n")
            log.flush()
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
                ev = evaluate(rollouts, tokenizer, eval_problems, opts, seed=opts.seed)
                m.update({f"eval_{k}": v for k, v in ev.items()})
            for msg in watch.update(m, opts):
                if main:
                    warnings.warn(f"grpo step {step}: {msg}", stacklevel=2)
                m.setdefault("warnings", []).append(msg)
            log.write(json.dumps(m) + "\n")
            log.flush()
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


def grpo_step(opts, step, model, ref, trainer, rollouts, tokenizer, sampler) -> tuple[dict, list]:
    """One GRPO step: rollouts, rewards, advantages, num_iterations updates. Returns (metrics,
    sample completions to log)."""
    from nanoseek.tasks.rewards import RewardStats, rewards_from_spec, score

    G, t0 = opts.num_generations, time.perf_counter()
    problems = sampler.take(opts.prompts_per_step)
    prompts = [encode_prompt(tokenizer, p.question, opts.template, opts.prefill) for p in problems]
    params = sampling(opts, len(prompts) * G, opts.seed, step, tokenizer.eos_id, opts.temperature)
    done = rollouts.generate([p for p in prompts for _ in range(G)], params)
    t_gen = time.perf_counter() - t0

    names, weights = rewards_from_spec(opts.rewards)
    stats, rows, totals, per_reward = RewardStats(), [], [], {n: [] for n in names}
    for i, c in enumerate(done):
        comp = completion_ids(c.token_ids, tokenizer.eos_id)
        text = tokenizer.decode(comp, skip_special_tokens=True)
        s = stats.add(score(names, weights, problems[i // G], text))
        totals.append(s.total)
        for n in names:
            per_reward[n].append(s.values[n])
        rows.append(dict(prompt=prompts[i // G], completion=comp, logprobs=c.logprobs,
                         truncated=c.finish_reason == "length", text=text))  # fmt: skip
    rewards = torch.tensor(totals)
    adv, std, zero = group_advantages(rewards, G, opts.scale_rewards)
    for r, a in zip(rows, adv.tolist()):
        r["advantage"] = a
    keep = [r for i, r in enumerate(rows) if not (opts.drop_zero_std and zero[i // G])
            and not (opts.mask_truncated and r["truncated"])]  # fmt: skip
    lengths = [len(r["completion"]) for r in rows]
    m = {
        "reward": rewards.mean().item(),
        "reward_std": std.mean().item(),
        "frac_reward_zero_std": zero.float().mean().item(),
        **{f"rewards/{n}/mean": sum(v) / len(v) for n, v in per_reward.items()},
        **{f"rewards/{n}/std": torch.tensor(v).std().item() for n, v in per_reward.items()},
        "completions/mean_length": sum(lengths) / len(lengths),
        "completions/min_length": min(lengths),
        "completions/max_length": max(lengths),
        "completions/clipped_ratio": sum(r["truncated"] for r in rows) / len(rows),
        "reward_errors": float(sum(stats.errors.values())),
        "completions_trained": len(keep),
    }
    for line in stats.report() if trainer.parallel.is_main else []:
        warnings.warn(f"grpo step {step + 1}: {line}", stacklevel=2)

    t1 = time.perf_counter()
    if keep:
        n_tok = sum(len(r["completion"]) for r in keep)
        norm = {"n_tokens": float(n_tok), "n_seqs": float(len(keep))}
        batches = rank_batches(keep, tokenizer.pad_id, opts.batch_size, norm, trainer.parallel)
        if ref is not None:
            fill_logprobs(ref, batches, "ref_logp", opts.temperature, trainer.autocast)
        if opts.num_iterations > 1:  # pi_old: this policy, before the first of mu updates
            fill_logprobs(model, batches, "old_logp", opts.temperature, trainer.autocast)
        its = [trainer.train_step(batches) for _ in range(opts.num_iterations)]
        for k in its[0]:  # averaged over the mu updates (TRL logs each; one line per step here)
            m[k] = sum(it[k] for it in its) / len(its)
    else:  # every group dropped: no signal, no update (the lr schedule does not advance)
        m["skipped_update"] = 1.0
    m["rollout_time_s"], m["update_time_s"] = t_gen, time.perf_counter() - t1
    m["step_time_s"] = time.perf_counter() - t0
    shown = [{"question": problems[i // G].question, "answer": problems[i // G].answer,
              "completion": rows[i]["text"], "reward": totals[i],
              "advantage": rows[i]["advantage"], "truncated": rows[i]["truncated"]}
             for i in _spread(len(rows), G, opts.log_completions)]  # fmt: skip
    return m, shown


def _spread(n: int, G: int, k: int) -> list[int]:
    """k row indices, one per group first (so different prompts are shown), then the rest."""
    order = [g * G + j for j in range(G) for g in range(n // G)]
    return order[:k]


# ------------------------------------------------------------------------------ checkpoints
def _save(opts, step, trainer, sampler, watch) -> str:
    from nanoseek.train.state import rng_state

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
    from nanoseek.checkpoint.io import CheckpointError
    from nanoseek.train.state import set_rng_state

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
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc="grpo", unit="step", dynamic_ncols=True, mininterval=1.0
    )


def write_plots(out_dir: str) -> None:
    """OUT/reward.png: training rewards per step (EMA) and held-out accuracy."""
    from nanoseek.analysis.plots import plot_curves, read_metrics

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
