"""GRPO rollouts: which problems are drawn, how prompts are encoded and sampled, the engine that
generates the completions, and held-out evaluation (used by nanoseek/train/grpo.py, which
re-exports these names).

Every completion is sampled with its own seed (`request_seed`), so a resumed run draws the same
problems (`PromptSampler` state) and samples the same tokens.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import TYPE_CHECKING

import torch

from nanoseek.config import ConfigError
from nanoseek.tasks.rewards import rewards_from_spec, score

if TYPE_CHECKING:
    from nanoseek.train.grpo import GRPOOptions

TEMPLATE_CHAT = "chat"


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


def held_out(tasks: list, n: int, seed: int, level: int | None) -> list:
    """`n` test-split problems spread over the tasks, unique where the space allows."""
    from nanoseek.tasks import TaskError

    problems = []
    for i, task in enumerate(tasks):
        k = n // len(tasks) + (i < n % len(tasks))
        try:
            problems += task.generate(k, "test", seed=seed, level=level, unique=True)
        except TaskError:  # a small test split (1-digit sums, a short JSONL file): repeats
            try:
                problems += task.generate(k, "test", seed=seed, level=level)
            except TaskError as e:  # none at all: train anyway, without held-out accuracy
                warnings.warn(f"no held-out evaluation for task {task.name!r}: {e}", stacklevel=2)
    return problems


def encode_prompt(tokenizer, question: str, template: str, prefill: bool) -> list[int]:
    """Prompt ids exactly as training documents start: bos + the template (+ "<think>")."""
    from nanoseek.tasks import format_prompt

    if template == TEMPLATE_CHAT:  # ends in "<think>\n" already (the R1 generation prompt)
        msgs = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    return tokenizer.encode(format_prompt(question, template, prefill=prefill), add_bos=True)


def sampling(
    opts, n: int, seed: int, step: int, stop_ids: tuple[int, ...], temperature: float,
    first: int = 0,
) -> list:  # fmt: skip
    """SamplingParams for completions first .. first + n - 1 of a step; each has its own seed
    (see `request_seed`). Extra rollout rounds of a step (dynamic sampling) continue the index."""
    from nanoseek.infer import SamplingParams

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
        from nanoseek.infer import Engine

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
            self.engine = Engine(self.model, max_batch_size=self.rows, max_seq_len=size)
        self.model.eval()  # the engine switches to eval once; the trainer switches back
        if self.world == 1:
            return self.engine.generate(prompts, params)
        import torch.distributed as dist

        mine = range(self.par.rank, len(prompts), self.world)
        done = (
            self.engine.generate([prompts[i] for i in mine], [params[i] for i in mine])
            if mine
            else []
        )
        parts = [None] * self.world
        dist.all_gather_object(parts, done)
        return [parts[i % self.world][i // self.world] for i in range(len(prompts))]

    def sync(self, policy) -> None:
        """Copy the (sharded) policy's weights into the replica (a collective)."""
        if self.world > 1:
            from nanoseek.dist.checkpoint import full_state_dict

            with torch.no_grad():
                self.model.load_state_dict(full_state_dict(policy, self.par, everywhere=True))


def rollout_round(
    opts: GRPOOptions, step: int, round_: int, rollouts: Rollouts, tokenizer, sampler, stats
) -> list[list[dict]]:
    """One rollout round of a step: `prompts_per_step` new problems, `num_generations` completions
    each, scored by the configured rewards (errors counted in `stats`, a RewardStats). Returns one
    group (list of G rows) per problem; a row: problem, prompt and completion ids, the engine's
    log-probs, truncated, text, reward (the weighted total) and rewards (per name)."""
    G = opts.num_generations
    problems = sampler.take(opts.prompts_per_step)
    prompts = [encode_prompt(tokenizer, p.question, opts.template, opts.prefill) for p in problems]
    n = len(prompts) * G
    params = sampling(opts, n, opts.seed, step, rollouts.stop_ids, opts.temperature, round_ * n)
    done = rollouts.generate([p for p in prompts for _ in range(G)], params)
    names, weights = rewards_from_spec(opts.rewards)
    rows = []
    for i, c in enumerate(done):
        comp = completion_ids(c.token_ids, rollouts.stop_ids)
        text = tokenizer.decode(comp, skip_special_tokens=True)
        s = stats.add(score(names, weights, problems[i // G], text))
        rows.append(dict(problem=problems[i // G], prompt=prompts[i // G], completion=comp,
                         logprobs=c.logprobs, truncated=c.finish_reason == "length", text=text,
                         reward=s.total, rewards=s.values))  # fmt: skip
    return [rows[g * G : (g + 1) * G] for g in range(len(problems))]


def completion_ids(tokens: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """The completion up to and including the first stop token (nothing after it counts)."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return list(tokens)


@torch.no_grad()
def evaluate(
    rollouts: Rollouts,
    tokenizer,
    problems: list,
    opts: GRPOOptions,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out accuracy: pass@1 (greedy by default, else the mean over `samples` samples) and,
    with samples > 1, pass@samples (any sample right). Also the format rate and lengths."""
    from nanoseek.tasks.rewards import accuracy_reward, format_reward

    prompts = [encode_prompt(tokenizer, p.question, opts.template, opts.prefill) for p in problems]
    n = samples if temperature > 0 else 1
    params = sampling(opts, len(prompts) * n, seed, -1, rollouts.stop_ids, temperature)
    done = rollouts.generate([p for p in prompts for _ in range(n)], params)
    right, fmt, lengths, clipped = [], 0.0, [], 0
    for i, c in enumerate(done):
        text = tokenizer.decode(
            completion_ids(c.token_ids, rollouts.stop_ids), skip_special_tokens=True
        )
        right.append(accuracy_reward(problems[i // n], text))
        fmt += format_reward(problems[i // n], text)
        lengths.append(len(c.token_ids))
        clipped += c.finish_reason == "length"
    per_problem = [right[i * n : (i + 1) * n] for i in range(len(problems))]
    out = {
        "accuracy": sum(right) / len(right),
        "format": fmt / len(done),
        "mean_length": sum(lengths) / len(lengths),
        "clipped_ratio": clipped / len(done),
    }
    if n > 1:
        out[f"pass@{n}"] = sum(any(r) for r in per_problem) / len(problems)
    return out
