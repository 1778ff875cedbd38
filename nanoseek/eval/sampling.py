"""The one sampling and evaluation path: prompts in a template, engine completions cut at stop
ids, scored by the task's rule reward, pass@1 and pass@k.

Evaluation (`nanoseek eval`), base choice, rejection sampling, sequence distillation and GRPO's
rollouts and held-out evaluation all do the same thing: render each problem as a prompt
(`encode_prompt`), draw completions, cut each at its first stop id and turn it back into the text
the verifier and the rewards read (`to_sample`), and score the samples (`score_samples`).
Generation itself is the engine's (the only place that generates tokens): `sample_problems` drives
it for evaluation and rejection sampling; GRPO's rollouts drive their own engine, because each
completion has its own seed and the engine lives across steps (nanoseek/train/grpo_rollouts.py).

Templates. "chat": the tokenizer's chat template with the generation prompt (ours ends in
"<think>\\n", as DeepSeek-R1's does; a template that does not open the block, ChatML say, leaves
the model to write "<think>" itself, which the rewards accept); what SFT/RL-tuned models see.
Any name of `nanoseek.tasks.TEMPLATES` ("short", "r1zero"): the raw prompt after bos, prefilled
with "<think>" (`prefill`), which is what the built-in pre-training corpus looks like, so use it
for a pre-trained base model.

Stopping. A completion ends at eos, at the chat template's end-of-turn token (`<|im_end|>`,
`<|eot_id|>`: whatever ends an assistant turn; dropped from the text), or at the first
`</answer>` token (kept in the text): after it there is nothing the verifier or the format
reward may read (`check_format` requires that nothing follows `</answer>`), and a small model's
rambling past it only costs time. (GRPO's rollouts stop at the tokenizer's stop ids only: what
follows `</answer>` is part of what the policy is rewarded for.) A completion that hits
`max_new_tokens` first is "truncated" (`Sample.finished` is False).

Scoring. A sample is correct when the task's strict verifier accepts the answer inside `<answer>`
(or `\\boxed{}`): the accuracy reward of RL [R1 §2.2.2]. pass@1 is the mean share of correct
samples per problem and pass@k the unbiased estimator from the same samples (passk.py).

A `SampleFn` (the signature `nanoseek.train.distill` uses) maps (model, prompt id lists,
max_new_tokens, temperature, seed) to generated id lists, each ending in a stop id when the model
stopped. `engine_sample_fn` is the real one; tests inject scripted ones to get known outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.eval.passk import mean_pass_at_k, report_ks
from nanoseek.infer import Engine, SamplingParams
from nanoseek.tasks import TEMPLATES, Problem, TaskError, format_chat, format_prompt
from nanoseek.tasks.extract import ANSWER_CLOSE
from nanoseek.tasks.rewards import format_reward

CHAT = "chat"
SampleFn = Callable[[torch.nn.Module, list[list[int]], int, float, int], list[list[int]]]
Verifier = Callable[[Problem, str], "bool | float"]  # (problem, completion text) -> correct


# ------------------------------------------------------------------------------ prompts
def template_names() -> tuple[str, ...]:
    return (CHAT, *TEMPLATES)


def check_template(template: str) -> None:
    if template not in template_names():
        raise TaskError(
            f"unknown template {template!r}; valid templates: {', '.join(template_names())}"
        )


def encode_prompt(
    tokenizer, problem: Problem, template: str = CHAT, system: bool | str = False,
    *, prefill: bool = True,
) -> list[int]:  # fmt: skip
    """The prompt ids of `problem`, exactly as training documents start. "chat": the tokenizer's
    chat template with the generation prompt (ours already ends in "<think>\\n", so `prefill`
    does not apply); a raw template: bos + the template, + " <think>" with `prefill`."""
    if template == CHAT:
        messages = format_chat(problem, system=system, include_answer=False)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    check_template(template)
    return tokenizer.encode(
        format_prompt(problem.question, template, prefill=prefill), add_bos=True
    )


def end_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end a reply and are not part of its text: eos, config.json's eos ids, the
    chat template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`)."""
    ids = getattr(tokenizer, "stop_ids", None)  # a tokenizer without them: eos alone
    return tuple(ids) if ids is not None else (tokenizer.eos_id,)


def stop_ids(tokenizer) -> tuple[int, ...]:
    """What evaluation stops at: `end_ids`, and `</answer>` when the tokenizer has it as one
    token (ours does: a markup token)."""
    ids = list(end_ids(tokenizer))
    close = tokenizer.encode(ANSWER_CLOSE)
    if len(close) == 1 and close[0] not in ids:
        ids.append(close[0])
    return tuple(ids)


# ------------------------------------------------------------------------------ completions
@dataclass
class Sample:
    """One completion of one problem."""

    problem: Problem
    text: str  # what the model wrote after the prompt, without a final end-of-turn token
    n_tokens: int  # generated tokens, stop token included
    finished: bool  # ended in a stop token; False: cut at max_new_tokens (truncated)
    token_ids: list[int] = field(default_factory=list)  # the completion, stop token included


def cut_at_stop(tokens: Sequence[int], stops: Sequence[int]) -> list[int]:
    """The completion up to and including the first stop id: nothing after it counts."""
    for i, t in enumerate(tokens):
        if t in stops:
            return [int(x) for x in tokens[: i + 1]]
    return [int(x) for x in tokens]


def to_sample(
    tokenizer, problem: Problem, tokens: Sequence[int], stops: Sequence[int],
    finished: bool | None = None,
) -> Sample:  # fmt: skip
    """`tokens` generated for `problem` as a Sample: cut at the first of `stops`, decoded without
    a final end-of-turn token (`</answer>` stays: it is part of the answer's text). `finished`:
    the engine's own word where the caller has it (finish_reason), else whether the completion
    ends in a stop id."""
    ids = cut_at_stop(tokens, stops)
    if finished is None:
        finished = bool(ids) and ids[-1] in stops
    body = ids[:-1] if ids and ids[-1] in end_ids(tokenizer) else ids
    # skip_special_tokens drops bos/eos/pad only: markup (<think>, </answer>) is text
    text = tokenizer.decode(body, skip_special_tokens=True)
    return Sample(problem, text, len(ids), bool(finished), ids)


def engine_sample_fn(
    stop_token_ids: Sequence[int] = (),
    *,
    batch_size: int = 64,
    top_p: float = 1.0,
    quantize: str | None = None,
) -> SampleFn:
    """A SampleFn on the engine: all prompts go in at once and the engine batches them (up to
    `batch_size` rows decode together, continuous batching refills finished rows). Request i
    gets seed `seed + i`, so a sample does not depend on what else is in the batch. A request
    whose prompt leaves fewer than max_new_tokens positions in the context gets the rest.
    quantize="int8": decode with weight-only int8 weights (nanoseek/infer/quant.py); without
    it the model's own weights, through the native kernels where the machine builds them (a
    sample does not depend on the threads either)."""
    stops = tuple(int(t) for t in stop_token_ids)

    def sample_fn(model, prompts, max_new_tokens, temperature, seed):
        if not prompts:
            return []
        ctx = model.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest >= ctx:
            raise ValueError(f"a prompt of {longest} tokens leaves no room in the context {ctx}")
        params = [
            SamplingParams(
                max_new_tokens=min(max_new_tokens, ctx - len(p)),
                temperature=temperature,
                top_p=top_p,
                seed=seed + i,
                stop_token_ids=stops,
            )
            for i, p in enumerate(prompts)
        ]
        was_training = model.training  # the engine puts the model in eval mode
        try:
            engine = Engine(
                model,
                max_batch_size=min(batch_size, len(prompts)),
                max_seq_len=min(ctx, longest + max_new_tokens),
                seed=seed,
                quantize=quantize,
            )
            return [c.token_ids for c in engine.generate([list(p) for p in prompts], params)]
        finally:
            model.train(was_training)

    return sample_fn


def sample_problems(
    model,
    tokenizer,
    problems: Sequence[Problem],
    k: int,
    *,
    template: str = CHAT,
    system: bool | str = False,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    sample_fn: SampleFn | None = None,
    chunk_size: int | None = None,
) -> list[list[Sample]]:
    """`k` completions of each problem: result[i][j] is sample j of problems[i].

    Raises ValueError when a prompt does not fit the model's context (naming the problem).
    `chunk_size` hands the sample function that many prompts per call (seed + offset each);
    None hands it everything at once (the engine batches internally).
    """
    if k < 1:
        raise ValueError(f"samples per problem must be >= 1, got {k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_template(template)
    stops = stop_ids(tokenizer)
    sample_fn = sample_fn or engine_sample_fn(stops)
    ctx = model.config.max_position_embeddings
    prompts = []
    for p in problems:
        ids = encode_prompt(tokenizer, p, template, system)
        if len(ids) >= ctx:
            raise ValueError(
                f"the prompt of problem {p.id} is {len(ids)} tokens, more than the model's "
                f"context (max_position_embeddings {ctx}) leaves room for: use shorter problems "
                "(a lower level) or a model with a longer context"
            )
        prompts.append(ids)
    jobs = [i for i in range(len(problems)) for _ in range(k)]
    step = chunk_size or max(len(jobs), 1)
    out: list[list[Sample]] = [[] for _ in problems]
    for start in range(0, len(jobs), step):
        chunk = jobs[start : start + step]
        gens = sample_fn(model, [prompts[i] for i in chunk], max_new_tokens, temperature,
                         seed + start)  # fmt: skip
        if len(gens) != len(chunk):
            raise RuntimeError(f"the sampler returned {len(gens)} completions for {len(chunk)}")
        for i, g in zip(chunk, gens):
            out[i].append(to_sample(tokenizer, problems[i], g, stops))
    return out


# ------------------------------------------------------------------------------ scoring
def score_samples(verify: Verifier, samples: Sequence[Sequence[Sample]], k: int) -> dict:
    """Accuracy (pass@1), pass@k, pass_at {j: pass@j for j = 1, 2, 4, ..., k}, format rate, mean
    length (tokens) and the truncated share of `samples[i]` (the k samples of problem i), overall
    and per level (by_level). `verify`: the task's strict verifier (`Task.verify_completion`) or
    the accuracy reward. Pure bookkeeping: no model involved."""
    ks = report_ks(k)

    def summarise(rows: Sequence[Sequence[Sample]]) -> dict:
        correct = [sum(bool(verify(s.problem, s.text)) for s in row) for row in rows]
        flat = [s for row in rows for s in row]
        n = max(len(flat), 1)
        return {
            "n_problems": len(rows),
            "accuracy": mean_pass_at_k(correct, k, 1),
            "pass@k": mean_pass_at_k(correct, k, k),
            "pass_at": {str(j): mean_pass_at_k(correct, k, j) for j in ks},
            "format_rate": sum(format_reward(s.problem, s.text) for s in flat) / n,
            "mean_length": sum(s.n_tokens for s in flat) / n,
            "truncated": sum(not s.finished for s in flat) / n,
        }

    result = summarise(samples)
    levels = sorted({row[0].problem.level for row in samples if row})
    result["by_level"] = {
        str(lvl): summarise([row for row in samples if row and row[0].problem.level == lvl])
        for lvl in levels
    }
    return result
