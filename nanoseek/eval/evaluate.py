"""Held-out evaluation of a model on a verifiable task: pass@1, pass@k, format, length.

    nanoseek eval runs/r1/final_rl/model --task addition --n 200 --k 8 --json
    from nanoseek.eval import evaluate
    result = evaluate(model, tokenizer, "addition", n_problems=200, k=8)
    result["accuracy"], result["pass@k"]

Problems come from the task's **test** split (hash-split by content, so no training stage ever
saw them; nanoseek/tasks/base.py; a task file given as a test set is all test split, and
n_problems = 0 evaluates every problem of it: nanoseek/tasks/resolve.py), each asked `k` times. `accuracy` is pass@1 = the mean share of
correct samples, `pass@k` the unbiased estimator from those k samples (passk.py). With k = 1 and
no temperature given, decoding is greedy; with k > 1 it defaults to R1's evaluation temperature
0.6 [R1 §3], since k greedy samples would all be the same.

A sample is correct when the task's strict verifier accepts the answer inside `<answer>` (or
`\\boxed{}`), the accuracy reward of RL; `format_rate` is the share of samples with the full
`</think> <answer>...</answer>` format; `truncated` the share cut at max_new_tokens. Prompts,
sampling and scoring are the shared path of sampling.py; this module picks the problems and
reports.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence

import torch

from nanoseek.checkpoint.io import CheckpointError, load
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.eval.sampling import (
    CHAT,
    SampleFn,
    check_template,
    engine_sample_fn,
    sample_problems,
    score_samples,
    stop_ids,
)
from nanoseek.tasks import Problem, Task, TaskError
from nanoseek.tasks.resolve import resolve_task

R1_EVAL_TEMPERATURE = 0.6  # [R1 §3.1]: pass@1 from k samples at temperature 0.6, top-p 0.95


def default_temperature(k: int) -> float:
    return 0.0 if k == 1 else R1_EVAL_TEMPERATURE


def heldout_problems(task: Task, n: int, seed: int = 0, level: int | None = None):
    """`n` distinct problems of the task's test split (deterministic in seed and level); n = 0:
    every one of a task file's. A small problem space (1-digit sums have ~5 held-out problems)
    gives all it has, with a warning."""
    if n < 0:
        raise ValueError(f"number of problems must be >= 0 (0: all of a task file), got {n}")
    if n == 0:
        n = task.count("test", level) or 0
        if n == 0:
            raise TaskError(
                f"task {task.name!r} generates problems without end: give the number of "
                "problems to evaluate (n >= 1); n = 0 (all) is for task files"
            )
    problems: list = []
    try:
        for p in task.stream("test", seed, level, unique=True):
            problems.append(p)
            if len(problems) == n:
                break
    except TaskError:  # the stream ran dry
        if not problems:
            raise
        warnings.warn(
            f"task {task.name!r} has only {len(problems)} distinct held-out problems"
            + (f" at level {level}" if level is not None else "")
            + f"; evaluating on those instead of {n}",
            stacklevel=2,
        )
    return problems


def heldout_across(tasks: Sequence[Task], n: int, seed: int = 0, level: int | None = None):
    """`n` test-split problems spread over `tasks` (task i gives n // T + (i < n % T)), distinct
    where the split has that many; a small test split (1-digit sums, a short task file) gives
    its problems with repeats, and a task without any is left out with a warning (an RL run then
    trains without its held-out accuracy). GRPO's held-out set."""
    problems: list[Problem] = []
    for i, task in enumerate(tasks):
        k = n // len(tasks) + (i < n % len(tasks))
        try:
            problems += task.generate(k, "test", seed=seed, level=level, unique=True)
        except TaskError:  # the distinct problems ran out: draw with repeats
            try:
                problems += task.generate(k, "test", seed=seed, level=level)
            except TaskError as e:
                warnings.warn(f"no held-out evaluation for task {task.name!r}: {e}", stacklevel=2)
    return problems


def resolve(task: str | Task, split: str | None = None) -> Task:
    """A Task, a registered name or a task JSONL file (its rows without a "split" field all
    `split`; None: the hash split); an unknown name lists the valid ones."""
    return resolve_task(task, split=split) if isinstance(task, str) else task


def evaluate(
    model,
    tokenizer,
    task: str | Task,
    n_problems: int = 100,
    k: int = 1,
    *,
    temperature: float | None = None,
    max_new_tokens: int = 256,
    template: str = CHAT,
    system: bool | str = False,
    seed: int = 0,
    level: int | None = None,
    n_show: int = 3,
    sample_fn: SampleFn | None = None,
) -> dict:
    """Evaluate on `n_problems` held-out problems with `k` samples each; returns a JSON-able dict:
    accuracy (pass@1), pass@k, pass_at {j: pass@j for j = 1, 2, 4, ..., k}, format_rate,
    mean_length (tokens), truncated (share), by_level {level: the same}, samples (the first
    `n_show` problems' first completions), the settings, and wall_s.
    `sample_fn` replaces the engine (tests use scripted models)."""
    t0 = time.perf_counter()
    t = resolve(task)
    check_template(template)
    if k < 1:
        raise ValueError(f"samples per problem (k) must be >= 1, got {k}")
    temp = default_temperature(k) if temperature is None else temperature
    problems = heldout_problems(t, n_problems, seed=seed, level=level)
    samples = sample_problems(
        model, tokenizer, problems, k, template=template, system=system, temperature=temp,
        max_new_tokens=max_new_tokens, seed=seed, sample_fn=sample_fn,
    )  # fmt: skip
    result = {
        "task": t.name,
        "split": "test",
        "level": level,
        "template": template,
        "samples_per_problem": k,
        "k": k,
        "temperature": temp,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        **score_samples(t.verify_completion, samples, k),
        "samples": [
            {
                "id": row[0].problem.id,
                "question": row[0].problem.question,
                "answer": row[0].problem.answer,
                "completion": row[0].text,
                "correct": t.verify_completion(row[0].problem, row[0].text),
            }
            for row in samples[:n_show]
        ],
    }
    result["wall_s"] = time.perf_counter() - t0
    return result


def evaluate_checkpoint(
    model_dir: str,
    task: str | Task,
    tokenizer_dir: str | None = None,
    device: str = "cpu",
    quantize: str | None = None,
    **kwargs,
) -> dict:
    """`evaluate` on a checkpoint directory (its tokenizer beside it, or `tokenizer_dir`);
    quantize="int8" samples with the weight-only int8 decode path."""
    t = resolve(task)  # fail on a bad name before loading
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: no such checkpoint directory")
    tok_dir = tokenizer_dir or model_dir
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir} (pass a tokenizer directory)")
    tokenizer = Tokenizer.load(tok_dir)
    model = load(model_dir, dtype=torch.float32, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer in {tok_dir} has {tokenizer.vocab_size} ids, more than the model's "
            f"vocab_size {model.config.vocab_size}: not this model's tokenizer"
        )
    if quantize is not None:
        kwargs["sample_fn"] = engine_sample_fn(stop_ids(tokenizer), quantize=quantize)
    return evaluate(model, tokenizer, t, **kwargs)


def format_result(r: dict) -> str:
    """A few readable lines of an evaluation result."""
    k = r["k"]
    head = (
        f"{r['task']} (test split, {r['n_problems']} problems x {k} samples, "
        f"temperature {r['temperature']}, template {r['template']})"
    )
    passes = ", ".join(f"pass@{j} {v:.1%}" for j, v in r["pass_at"].items())
    lines = [
        head,
        f"  accuracy (pass@1) {r['accuracy']:.1%}" + (f"; {passes}" if k > 1 else ""),
        f"  format {r['format_rate']:.1%}, truncated {r['truncated']:.1%}, "
        f"mean length {r['mean_length']:.1f} tokens, {r['wall_s']:.1f} s",
    ]
    if len(r["by_level"]) > 1:
        lines.append(
            "  by level: "
            + ", ".join(f"{lvl}: {v['accuracy']:.1%}" for lvl, v in r["by_level"].items())
        )
    for s in r["samples"]:
        mark = "right" if s["correct"] else "wrong"
        text = " ".join(s["completion"].split())
        lines.append(f"  [{mark}] {s['question']!r} -> {text[:160]!r}")
    return "\n".join(lines)
