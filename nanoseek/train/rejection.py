"""Rejection sampling [R1 §2.3.3]: many samples per prompt, keep the right and readable ones.

    nanoseek rejection-sample --model runs/r1/reasoning_rl/model --task addition \\
        --n-prompts 500 --samples 8 --out runs/rs/samples.jsonl

R1's third stage samples many answers per prompt from the reasoning-RL checkpoint and keeps only
correct, readable ones (~600k), then fine-tunes the *base* model on them (2 epochs). Here:

1. `n_prompts` distinct problems of the task's **train** split (evaluation uses the test split),
   `samples` completions each from the engine, through the path evaluation uses (prompts,
   stop ids, cutting: nanoseek/eval/sampling.py);
2. `SampleFilter` drops, in this order: truncated samples (no stop token before max_new_tokens),
   wrong ones (the task's strict verifier), ill-formed ones (the format reward: reasoning, then
   `</think> <answer>...</answer>` and nothing after), unreadable ones (the language-consistency
   reward or the readability reward below their thresholds: R1 filters "mixed languages, long
   paragraphs and code blocks" out of the CoT), and duplicates of an already kept sample of the
   same prompt (compared as normalised text: case and whitespace do not make a new sample);
3. the kept samples are written as SFT chat JSONL (`{"messages": [user, assistant]}`, the format
   `nanoseek sft` reads), and the counts - overall and per prompt, with the acceptance rate - to
   the .json beside it. The .json is written last: its presence marks a finished run.

`SampleFilter` is also what sequence-level distillation uses to filter a teacher's samples
(nanoseek/train/distill.py), so the two paths keep identical rules.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

from nanoseek.checkpoint.io import load
from nanoseek.config import ConfigError
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.eval.sampling import (
    CHAT,
    Sample,
    SampleFn,
    check_template,
    engine_sample_fn,
    sample_problems,
    stop_ids,
)
from nanoseek.tasks import Problem, Task, format_chat
from nanoseek.tasks.extract import THINK_OPEN
from nanoseek.tasks.resolve import resolve_task
from nanoseek.tasks.rewards import format_reward, make_language_reward, readability_reward
from nanoseek.train.run_setup import tokenizer_dir
from nanoseek.train.sft_data import write_chat_jsonl

REASONS = ("truncated", "wrong", "ill_formed", "unreadable", "duplicates")


def normalise(text: str) -> str:
    """The text two samples are compared by: case-folded, whitespace runs collapsed."""
    return " ".join(text.split()).casefold()


class SampleFilter:
    """Keeps or rejects samples one at a time and counts why, overall and per prompt.

    min_language / min_readability: thresholds on the language-consistency and readability
    rewards (nanoseek/tasks/rewards.py; 0 turns a check off). keep_unverified: keep wrong,
    ill-formed, unreadable and truncated samples too (still counted; duplicates still dropped).
    """

    def __init__(
        self,
        task: Task,
        *,
        min_language: float = 0.0,
        min_readability: float = 0.0,
        language: str = "en",
        keep_unverified: bool = False,
    ):
        self.task = task
        self.min_language, self.min_readability = min_language, min_readability
        self.language_reward = make_language_reward(language)
        self.keep_unverified = keep_unverified
        self._prompts: dict[str, dict] = {}  # problem id -> its counts (insertion ordered)
        self._seen: dict[str, set[str]] = {}  # problem id -> normalised kept texts

    def rejection_reason(self, s: Sample) -> str | None:
        """Why `s` is not a good sample (ignoring duplicates), or None."""
        if not s.finished:
            return "truncated"
        if not self.task.verify_completion(s.problem, s.text):
            return "wrong"
        if not format_reward(s.problem, s.text):
            return "ill_formed"
        if self.min_language > 0 and self.language_reward(s.problem, s.text) < self.min_language:
            return "unreadable"
        if (
            self.min_readability > 0
            and readability_reward(s.problem, s.text) < self.min_readability
        ):
            return "unreadable"
        return None

    def add(self, s: Sample) -> bool:
        """Count `s`; True when it is kept."""
        p = s.problem
        c = self._prompts.setdefault(
            p.id,
            {"id": p.id, "level": p.level, "samples": 0, "verified": 0, "kept": 0,
             **{r: 0 for r in REASONS}},
        )  # fmt: skip
        c["samples"] += 1
        c["verified"] += bool(self.task.verify_completion(p, s.text))
        reason = self.rejection_reason(s)
        if reason is not None:
            c[reason] += 1
            if not self.keep_unverified:
                return False
        key = normalise(s.text)
        seen = self._seen.setdefault(p.id, set())
        if key in seen:
            c["duplicates"] += 1
            return False
        seen.add(key)
        c["kept"] += 1
        return True

    def per_prompt(self) -> list[dict]:
        return [dict(c) for c in self._prompts.values()]

    def counts(self) -> dict:
        """Totals: prompts, samples, verified, kept, each rejection reason, prompts_kept and
        acceptance_rate (kept / samples)."""
        rows = self._prompts.values()
        total = {k: sum(c[k] for c in rows) for k in ("samples", "verified", "kept", *REASONS)}
        return {
            "prompts": len(self._prompts),
            **total,
            "prompts_kept": sum(c["kept"] > 0 for c in rows),
            "acceptance_rate": total["kept"] / max(total["samples"], 1),
        }


def reply_opening(tokenizer, system: bool | str = False) -> str:
    """What the chat template's generation prompt already wrote into the assistant's reply
    (R1's "<think>\n"; nothing for ChatML or Llama-3): a sample continues it, so the SFT
    reply is that opening plus the sample's text. "<think>\n" for tokenizers without a template."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        return f"{THINK_OPEN}\n"
    probe = format_chat(Problem("probe", "probe", "?", "0"), system=system, include_answer=False)
    try:
        return tokenizer.chat_turn(probe).opened
    except ValueError:
        return f"{THINK_OPEN}\n"


def to_conversation(s: Sample, system: bool | str = False,
                    opening: str = f"{THINK_OPEN}\n") -> list[dict[str, str]]:  # fmt: skip
    """A kept sample as SFT chat messages: the prompt, then the reply as the model produced it
    after the generation prompt (`opening`, see `reply_opening`, then the sampled text)."""
    messages = format_chat(s.problem, system=system, include_answer=False)
    messages.append({"role": "assistant", "content": opening + s.text})
    return messages


# ------------------------------------------------------------------------------ the command
@dataclass
class RejectionOptions:
    model: str = ""  # checkpoint directory to sample from (the reasoning-RL model in R1)
    task: str = ""  # task name or task JSONL file; prompts come from its train split
    # a task file is a training set, all of it prompts (rows' own "split" fields still rule);
    # True keeps its 10% hash test split out, for a file that is also evaluated on (pipeline)
    task_holdout: bool = False
    out: str = "runs/rejection/samples.jsonl"  # SFT chat JSONL; statistics go to OUT.json
    tokenizer: str | None = None  # tokenizer directory; None: the model directory
    n_prompts: int = 200  # distinct train problems
    samples: int = 8  # completions per problem
    level: int | None = None  # None: every level of the task
    template: str = CHAT  # chat | short | r1zero (nanoseek/eval/sampling.py)
    system: bool = False  # the R1-Zero instruction as a system message (chat template)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    min_language: float = 0.9  # language-consistency reward of the CoT at least this
    min_readability: float = 0.9  # readability reward (no repeated or run-on lines) at least this
    language: str = "en"
    keep_unverified: bool = False  # keep wrong / ill-formed samples too (smoke runs, ablations)
    batch_size: int = 64  # engine rows decoding together
    seed: int = 0

    def validate(self) -> None:
        if not self.model or not os.path.isdir(self.model):
            raise ConfigError(f"option 'model': {self.model!r} is not a checkpoint directory")
        if not self.task:
            raise ConfigError("no task: give --task NAME (its verifier filters the samples)")
        resolve_task(self.task)  # an unknown name fails now, listing the valid ones
        check_template(self.template)
        for name in ("n_prompts", "samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("min_language", "min_readability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"option '{name}' must be in [0, 1], got {getattr(self, name)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("option 'temperature' must be >= 0 and 'top_p' in (0, 1]")
        make_language_reward(self.language)  # an unknown language fails now


def stats_path(out: str) -> str:
    """samples.jsonl -> samples.json (the statistics beside the data)."""
    root, ext = os.path.splitext(out)
    return (root if ext in (".jsonl", ".ndjson") else out) + ".json"


def run_rejection(
    opts: RejectionOptions, progress: bool = True, sample_fn: SampleFn | None = None
) -> dict:
    """Sample, filter, write OUT (chat JSONL) and OUT.json (statistics); returns the statistics.
    `sample_fn` replaces the engine (tests use scripted samples)."""
    opts.validate()
    task = resolve_task(opts.task, split=None if opts.task_holdout else "train")
    tokenizer = Tokenizer.load(tokenizer_dir(opts.model, opts.tokenizer))
    model = load(opts.model, dtype=torch.float32)
    problems = task.generate(opts.n_prompts, "train", seed=opts.seed, level=opts.level,
                             unique=True)  # fmt: skip
    if progress:
        print(
            f"rejection sampling: {len(problems)} {task.name} prompts x {opts.samples} samples "
            f"from {opts.model}",
            file=sys.stderr,
        )
    rows = sample_problems(
        model, tokenizer, problems, opts.samples, template=opts.template, system=opts.system,
        temperature=opts.temperature, max_new_tokens=opts.max_new_tokens, seed=opts.seed,
        sample_fn=sample_fn or engine_sample_fn(
            stop_ids(tokenizer), batch_size=opts.batch_size, top_p=opts.top_p),
    )  # fmt: skip
    filt = SampleFilter(
        task, min_language=opts.min_language, min_readability=opts.min_readability,
        language=opts.language, keep_unverified=opts.keep_unverified,
    )  # fmt: skip
    opening = reply_opening(tokenizer, opts.system)
    kept = [to_conversation(s, opts.system, opening) for row in rows for s in row if filt.add(s)]
    write_chat_jsonl(kept, opts.out)
    stats = {
        **filt.counts(),
        "task": task.name,
        "model": opts.model,
        "data": opts.out,
        "options": {k: v for k, v in vars(opts).items()},
        "per_prompt": filt.per_prompt(),
    }
    tmp = stats_path(opts.out) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=2)
    os.replace(tmp, stats_path(opts.out))
    return stats


def format_stats(stats: dict) -> str:
    """One readable line of what was kept and why the rest was not."""
    dropped = ", ".join(f"{stats[r]} {r.replace('_', ' ')}" for r in REASONS if stats[r])
    return (
        f"kept {stats['kept']} of {stats['samples']} samples ({stats['acceptance_rate']:.1%}) "
        f"for {stats['prompts_kept']} of {stats['prompts']} prompts; {stats['verified']} "
        f"verified" + (f"; dropped: {dropped}" if dropped else "")
    )
