"""One RL step on the shared loop: rollout rounds, rewards, advantages, group filters and
`num_iterations` optimizer steps, each piece as the options' algorithm configures it
(algorithms.py); and the micro-batch loss function the loop calls. Driven by nanoseek/train/grpo.py.
"""

from __future__ import annotations

import time
import warnings

import torch

from nanoseek.tasks.rewards import RewardStats, rewards_from_spec
from nanoseek.train.grpo_rollouts import rollout_round
from nanoseek.train.rl.advantages import group_std
from nanoseek.train.rl.batches import IGNORE, fill_logprobs, rank_batches
from nanoseek.train.rl.dynamic_sampling import sample_until_full
from nanoseek.train.rl.filters import select
from nanoseek.train.rl.logprobs import masked_mean, token_entropy, token_logprobs
from nanoseek.train.rl.normalization import BatchCounts
from nanoseek.train.rl.objective import rl_objective


def make_loss_fn(opts):
    """(model, micro-batch, step) -> (loss, metrics) for `Trainer.train_step`: the configured RL
    objective (rl/objective.py) in the loop's units, so the micro-batches add up to the batch."""
    cfg = opts.rl()
    P, G = opts.prompts_per_step, opts.num_generations

    def loss_fn(model, batch, step: int):
        out = model(batch["input_ids"], mtp=False, token_mask=batch["token_mask"])
        logits = out.logits[:, :-1]  # [b,L-1,V]: position t predicts token t+1
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        logp = token_logprobs(logits, targets.clamp(min=0), opts.temperature)
        old = batch["old_logp"] if batch["old_logp"] is not None else logp.detach()
        counts = BatchCounts(batch["n_tokens"], batch["n_seqs"], P * G, opts.max_completion_length)
        obj = rl_objective(cfg, logp, old, batch["advantages"], mask, batch["ref_logp"], counts)
        loss, res = obj.loss, obj.tokens
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


def grpo_step(opts, step, model, ref, trainer, rollouts, tokenizer, sampler) -> tuple[dict, list]:
    """One RL step: rollout rounds (one; more with dynamic sampling), advantages, group filters,
    num_iterations updates. Returns (metrics, sample completions to log)."""
    cfg, G, t0 = opts.rl(), opts.num_generations, time.perf_counter()
    stats = RewardStats()
    filled = sample_until_full(
        lambda k: rollout_round(opts, step, k, rollouts, tokenizer, sampler, stats),
        _has_signal, opts.prompts_per_step, cfg.max_extra_rounds if cfg.dynamic_sampling else 0,
    )  # fmt: skip
    rows = [r for group in filled.groups for r in group]
    t_gen = time.perf_counter() - t0
    rewards = torch.tensor([r["reward"] for r in rows])
    truncated = torch.tensor([r["truncated"] for r in rows])
    chosen = filled.chosen if cfg.dynamic_sampling else None
    sel = select(cfg, rewards, G, truncated, chosen)
    adv, keep = sel.advantages, sel.keep
    for r, a in zip(rows, adv.values.tolist()):
        r["advantage"] = a
    keep = [r for r, k in zip(rows, keep.tolist()) if k]
    names = rewards_from_spec(opts.rewards)[0]
    per_reward = {n: [r["rewards"][n] for r in rows] for n in names}
    lengths = [len(r["completion"]) for r in rows]
    m = {
        "reward": rewards.mean().item(),
        "reward_std": adv.std.mean().item(),
        "frac_reward_zero_std": adv.zero_std.float().mean().item(),
        **{f"rewards/{n}/mean": sum(v) / len(v) for n, v in per_reward.items()},
        **{f"rewards/{n}/std": torch.tensor(v).std().item() for n, v in per_reward.items()},
        "completions/mean_length": sum(lengths) / len(lengths),
        "completions/min_length": min(lengths),
        "completions/max_length": max(lengths),
        "completions/clipped_ratio": sum(r["truncated"] for r in rows) / len(rows),
        "reward_errors": float(sum(stats.errors.values())),
        "completions_trained": len(keep),
    }
    if cfg.dynamic_sampling:
        m["sampling/rounds"] = float(filled.rounds)
        m["sampling/groups_with_signal"] = float(len(filled.chosen))
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
    shown = [{"question": rows[i]["problem"].question, "answer": rows[i]["problem"].answer,
              "completion": rows[i]["text"], "reward": rows[i]["reward"],
              "advantage": rows[i]["advantage"], "truncated": rows[i]["truncated"]}
             for i in _spread(len(rows), G, opts.log_completions)]  # fmt: skip
    return m, shown


def _has_signal(group: list[dict]) -> bool:
    """The group's rewards differ (the test behind `zero_std`, advantages.py)."""
    std = group_std(torch.tensor([[r["reward"] for r in group]]))
    return not bool(torch.isclose(std, torch.zeros_like(std)).item())


def _spread(n: int, G: int, k: int) -> list[int]:
    """k row indices, one per group first (so different prompts are shown), then the rest."""
    order = [g * G + j for j in range(G) for g in range(n // G)]
    return order[:k]
