"""GRPO rollouts: which problems are drawn, the per-completion seeds, the engine that generates
the completions, and held-out evaluation on that engine (driven by nanoseek/train/grpo.py and
nanoseek/train/rl/step.py; `opts` is a GRPOOptions).

Prompts are encoded, completions cut at the stop ids and scored by the shared sampling path
(nanoseek/eval/sampling.py), as in `nanoseek eval` and rejection sampling. What is the rollouts'
own: every completion is sampled with its own seed (`request_seed`), so a resumed run draws the
same problems (`PromptSampler` state) and samples the same tokens; the engine lives across steps
on the policy's weights; and a completion stops at the tokenizer's stop ids only, since the
policy is rewarded for what it writes after `</answer>` too (the format reward).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from nanoseek.config import ConfigError
from nanoseek.dist.checkpoint import full_state_dict
from nanoseek.eval.sampling import encode_prompt, score_samples, to_sample
from nanoseek.infer import Engine, SamplingParams
from nanoseek.tasks.rewards import accuracy_reward, rewards_from_spec, score


# ------------------------------------------------------------------------------ prompts
class PromptSampler:
    """Training problems in a fixed order: problem i comes from task i mod n_tasks (each task's
    own deterministic stream). `drawn` is the whole position, so resuming replays the streams."""

    def __init__(self, tasks: list, seed: int, level: int | None):
        self.tasks, self.seed, self.level = tasks, seed, level
        self.drawn = 0
        self._streams = [t.stream("train", seed, level) for t in tasks]

    def take(self, n: int) -> list:
        out = [next(self._streams[(self.drawn + k) % len(self.tasks)]) for k in range(n)]
        self.drawn += n
        return out

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(self.tasks, self.seed, self.level)
        self.take(int(state["drawn"]))


def sampling(
    opts, n: int, seed: int, step: int, stop_ids: tuple[int, ...], temperature: float,
    first: int = 0,
) -> list:  # fmt: skip
    """SamplingParams for completions first .. first + n - 1 of a step; each has its own seed
    (see `request_seed`). Extra rollout rounds of a step (dynamic sampling) continue the index."""
    return [SamplingParams(max_new_tokens=opts.max_completion_length, temperature=temperature,
                           top_p=opts.top_p, seed=request_seed(seed, step, i), logprobs=True,
                           stop_token_ids=tuple(stop_ids)) for i in range(first, first + n)]  # fmt: skip


def request_seed(seed: int, step: int, index: int) -> int:
    """A per-completion sampling seed: rollouts depend on (seed, step, index) only, not on what
    else the engine batches or on any global RNG, so a resumed run samples the same tokens."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# ------------------------------------------------------------------------------ generation
class Rollouts:
    """Owns the engine (built lazily, rebuilt when a longer prompt needs more cache).

    One process: the engine runs on the policy itself (it reads the weights through views, so
    optimizer steps reach it). Under torchrun (`par.distributed`) the policy is sharded, so
    `model` is a full replica on every rank, refreshed from the policy by `sync` after each
    update; every rank generates completions rank, rank + W, ... and all ranks receive all of
    them in order. Each completion has its own seed, so the tokens do not depend on which rank
    generated them."""

    def __init__(self, model, stop_ids: tuple[int, ...], rows: int, par=None):
        # eos and the chat template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`)
        self.model, self.stop_ids, self.par = model, tuple(stop_ids), par
        self.world = par.world_size if par is not None and par.distributed else 1
        self.rows = -(-rows // self.world)
        self.engine = None
        self.limit = model.config.max_position_embeddings

    def generate(self, prompts: list[list[int]], params: list) -> list:
        need = max(len(p) for p in prompts) + max(sp.max_new_tokens for sp in params) + 1
        if need > self.limit:
            raise ConfigError(
                f"a prompt of {max(len(p) for p in prompts)} tokens + max_completion_length "
                f"exceeds the model's context of {self.limit} tokens; lower "
                "max_completion_length or use a shorter template"
            )
        if self.engine is None or self.engine.max_seq_len < need:
            # the engine holds views of the weights, so optimizer steps reach it without a rebuild
            size = min(self.limit, need + need // 2)  # headroom for longer prompts
            # the native kernels where the machine builds them (nanoseek/infer/native.py): a
            # row's tokens depend neither on the other rows nor on the threads
            self.engine = Engine(self.model, max_batch_size=self.rows, max_seq_len=size)
        self.model.eval()  # the engine switches to eval once; the trainer switches back
        if self.world == 1:
            return self.engine.generate(prompts, params)
        mine = range(self.par.rank, len(prompts), self.world)
        done = (
            self.engine.generate([prompts[i] for i in mine], [params[i] for i in mine])
            if mine
            else []
        )
        parts = [None] * self.world
        dist.all_gather_object(parts, done)
        return [parts[i % self.world][i // self.world] for i in range(len(prompts))]

    def sample(self, tokenizer, problem, completion):
        """An engine Completion as a Sample: cut at the first stop id, truncated only where the
        engine ran out of tokens (it also stops at the model config's eos ids)."""
        finished = completion.finish_reason != "length"
        return to_sample(tokenizer, problem, completion.token_ids, self.stop_ids, finished)

    def sync(self, policy) -> None:
        """Copy the (sharded) policy's weights into the replica (a collective)."""
        if self.world > 1:
            with torch.no_grad():
                self.model.load_state_dict(full_state_dict(policy, self.par, everywhere=True))


def rollout_round(opts, step: int, round_: int, rollouts: Rollouts, tokenizer, sampler,
                  stats) -> list[list[dict]]:  # fmt: skip
    """One rollout round of a step: `prompts_per_step` new problems, `num_generations` completions
    each, scored by the configured rewards (errors counted in `stats`, a RewardStats). Returns one
    group (list of G rows) per problem; a row: problem, prompt and completion ids (through the
    stop token: it is trained on), the engine's log-probs, truncated, text, reward (the weighted
    total) and rewards (per name)."""
    G = opts.num_generations
    problems = sampler.take(opts.prompts_per_step)
    prompts = [encode_prompt(tokenizer, p, opts.template, prefill=opts.prefill) for p in problems]
    n = len(prompts) * G
    params = sampling(opts, n, opts.seed, step, rollouts.stop_ids, opts.temperature, round_ * n)
    done = rollouts.generate([p for p in prompts for _ in range(G)], params)
    names, weights = rewards_from_spec(opts.rewards)
    rows = []
    for i, c in enumerate(done):
        problem = problems[i // G]
        s = rollouts.sample(tokenizer, problem, c)
        r = stats.add(score(names, weights, problem, s.text))
        rows.append(dict(problem=problem, prompt=prompts[i // G], completion=s.token_ids,
                         logprobs=c.logprobs, truncated=not s.finished, text=s.text,
                         reward=r.total, rewards=r.values))  # fmt: skip
    return [rows[g * G : (g + 1) * G] for g in range(len(problems))]


@torch.no_grad()
def evaluate_heldout(
    rollouts: Rollouts,
    tokenizer,
    problems: list,
    opts,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out accuracy on the rollouts' engine: pass@1 (greedy by default, else the mean over
    `samples` samples) and, with samples > 1, pass@samples; the format rate, mean length and
    clipped ratio. Scored as `nanoseek eval` scores (sampling.py), by the accuracy reward RL
    trains on; the keys are the ones GRPO logs with an `eval_` prefix."""
    prompts = [encode_prompt(tokenizer, p, opts.template, prefill=opts.prefill) for p in problems]
    n = samples if temperature > 0 else 1
    params = sampling(opts, len(prompts) * n, seed, -1, rollouts.stop_ids, temperature)
    done = rollouts.generate([p for p in prompts for _ in range(n)], params)
    rows = [[rollouts.sample(tokenizer, p, c) for c in done[i * n : (i + 1) * n]]
            for i, p in enumerate(problems)]  # fmt: skip
    r = score_samples(accuracy_reward, rows, n)
    out = {
        "accuracy": r["accuracy"],
        "format": r["format_rate"],
        "mean_length": r["mean_length"],
        "clipped_ratio": r["truncated"],
    }
    if n > 1:
        out[f"pass@{n}"] = r["pass@k"]
    return out
