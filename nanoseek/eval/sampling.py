"""Completions of task problems: prompts in a template, the engine, stop tokens, truncation.

Evaluation, rejection sampling and sequence distillation all do the same thing: render each
problem as a prompt, draw k completions per prompt, and turn the token ids back into text the
verifier and the rewards read. This module is that one path; generation itself is the engine's
(the engine is the only place that generates tokens).

Templates. "chat": the tokenizer's chat template with the generation prompt (ours ends in
"<think>\\n", as DeepSeek-R1's does; a template that does not open the block, ChatML say, leaves
the model to write "<think>" itself, which the rewards accept); what SFT/RL-tuned models see.
Any name of `nanoseek.tasks.TEMPLATES` ("short", "r1zero"): the raw prompt prefilled with
"<think>", which is what the built-in pre-training corpus looks like, so use it for a
pre-trained base model.

Stopping. A completion ends at eos, at the chat template's end-of-turn token (`<|im_end|>`,
`<|eot_id|>`: whatever ends an assistant turn; dropped from the text), or at the first
`</answer>` token (kept in the text): after it there is nothing the verifier or the format
reward may read (`check_format` requires that nothing follows `</answer>`), and a small model's
rambling past it only costs time. A completion that hits `max_new_tokens` first is "truncated"
(`Sample.finished` is False).

A `SampleFn` (the signature `nanoseek.train.distill` uses) maps (model, prompt id lists,
max_new_tokens, temperature, seed) to generated id lists, each ending in a stop id when the model
stopped. `engine_sample_fn` is the real one; tests inject scripted ones to get known outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nanoseek.tasks import TEMPLATES, Problem, TaskError, format_chat, format_prompt
from nanoseek.tasks.extract import ANSWER_CLOSE

CHAT = "chat"
SampleFn = Callable[[torch.nn.Module, list[list[int]], int, float, int], list[list[int]]]


def template_names() -> tuple[str, ...]:
    return (CHAT, *TEMPLATES)


def check_template(template: str) -> None:
    if template not in template_names():
        raise TaskError(
            f"unknown template {template!r}; valid templates: {', '.join(template_names())}"
        )


def encode_prompt(
    tokenizer, problem: Problem, template: str = CHAT, system: bool | str = False
) -> list[int]:
    """The prompt ids of `problem`; generation continues inside the `<think>` block."""
    if template == CHAT:
        messages = format_chat(problem, system=system, include_answer=False)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    check_template(template)
    return tokenizer.encode(format_prompt(problem.question, template), add_bos=True)


def stop_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's stop ids (eos, config.json's eos ids, the chat template's end-of-turn
    token: `<|im_end|>`, `<|eot_id|>`), and `</answer>` when the tokenizer has it as one token
    (ours does: a markup token)."""
    ids = list(getattr(tokenizer, "stop_ids", (tokenizer.eos_id,)))
    close = tokenizer.encode(ANSWER_CLOSE)
    if len(close) == 1 and close[0] not in ids:
        ids.append(close[0])
    return tuple(ids)


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
    quantize="int8": decode with weight-only int8 weights (nanoseek/infer/quant.py)."""
    from nanoseek.infer import Engine, SamplingParams

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


@dataclass
class Sample:
    """One completion of one problem."""

    problem: Problem
    text: str  # what the model wrote after the prompt, without a final eos
    n_tokens: int  # generated tokens, stop token included
    finished: bool  # ended in a stop token; False: cut at max_new_tokens (truncated)


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
    ends = set(getattr(tokenizer, "stop_ids", (tokenizer.eos_id,)))
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
            g = [int(t) for t in g]
            finished = bool(g) and g[-1] in stops
            # the end-of-turn token goes; `</answer>` is part of the answer's text
            body = g[:-1] if finished and g[-1] in ends else g
            # skip_special_tokens drops bos/eos/pad only: markup (<think>, </answer>) is text
            text = tokenizer.decode(body, skip_special_tokens=True)
            out[i].append(Sample(problems[i], text, len(g), finished))
    return out
