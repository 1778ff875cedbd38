"""The built-in pre-training corpus: verifiable problems with worked solutions, no downloads.

Each document is one problem in the R1-Zero format [R1 §2.2.3, Table 1]: the prompt, the worked
solution inside `<think>...</think>`, the answer inside `<answer>...</answer>`. A model
pre-trained on it learns the format and some real ability, which is what makes the later RL stage
work at all: reward curves rise only when the starting model already solves some problems
(pass@k > 0). The task families are mixed uniformly, each document's level uniformly from the
task's levels.

Held-out problems never get in: documents come from `Task.stream(split)`, whose hash split
(`nanoseek.tasks.base.split_of`) rejects every problem of the other split, whatever the seed.

Documents stay short (~80-570 characters with the default "short" template) so a tiny model
with a 256-512 token context sees whole documents: with a 1k-vocab BPE that splits digits, the
longest are ~250 tokens up to level 4 and ~410 at level 6 (6-digit products), so pass
`levels=(1, 2, 3, 4)` for a 256-token context. The "short" template is the tail of the
"r1zero" one (`User: ...\\nAssistant: <think>`), so a model trained on it still recognises an
R1-Zero prompt; pass `template="r1zero"` to train on the full instruction (~400 characters more).

    write_corpus("corpus.jsonl", 100_000, seed=0)            # {"text": ...} per line
    write_corpus("corpus.txt", 100_000)                      # documents separated by "\\n\\n"
    # read back with nanoseek.data.sources.read_documents(path, separator="\\n\\n")
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from nanoseek.tasks import (
    SPLITS,
    TEMPLATES,
    Problem,
    TaskError,
    format_chat,
    format_document,
    get_task,
)

DEFAULT_TASKS = ("arithmetic", "countdown", "linear_equation")
DOC_SEPARATOR = "\n\n"  # between documents in plain-text output; documents never contain it


def _resolve_levels(
    names: Sequence[str], levels: Sequence[int] | Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """Per task, the levels to draw from: all, a shared list (clipped to each task's), or a map."""
    out = {}
    for name in names:
        task = get_task(name)  # unknown names fail here, listing the valid ones
        if levels is None:
            wanted = task.levels
        elif isinstance(levels, Mapping):
            wanted = tuple(levels.get(name, task.levels))
        else:
            wanted = tuple(levels)
        chosen = tuple(lvl for lvl in wanted if lvl in task.levels)
        if not chosen:
            raise TaskError(
                f"no valid level for task {name!r} in {list(wanted)}; its levels: "
                f"{', '.join(map(str, task.levels))}"
            )
        out[name] = chosen
    return out


def generate_corpus(
    n_docs: int,
    seed: int = 0,
    tasks: Sequence[str] = DEFAULT_TASKS,
    levels: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    split: str = "train",
    template: str = "short",
    level_weights: Mapping[int, float] | None = None,
    task_weights: Mapping[str, float] | None = None,
    direct: Mapping[str, float] | None = None,
) -> Iterator[str]:
    """Yield `n_docs` documents mixing `tasks`, deterministic in all arguments.

    `levels`: None (each task's own levels), one list for every task (levels a task lacks are
    skipped: `(1, 2, 3)` gives countdown 2-3 numbers), or a map from task name to levels.
    `split="test"` gives a held-out corpus (e.g. for validation loss); the default training
    corpus never contains a test problem. `level_weights` ({level: weight}) draws levels with
    these relative weights instead of uniformly (a level missing from it is never drawn): a
    corpus that is mostly easy problems with a few hard ones, the starting point of an RL stage
    that has something left to learn. `task_weights` ({task: weight}) mixes the tasks likewise.
    `direct` ({task: fraction}) gives that fraction of a task's documents without the worked
    solution: the thinking is only the solution's last line ("So 57 + 46 = 103."), an answer
    stated without working, as much of real text states them.
    """
    if template not in TEMPLATES:
        raise TaskError(f"unknown template {template!r}; valid templates: {', '.join(TEMPLATES)}")
    problems = generate_problems(n_docs, seed, tasks, levels, split, level_weights,
                                 task_weights, direct)  # fmt: skip
    return (format_document(p, template) for p in problems)


def generate_problems(
    n_docs: int,
    seed: int = 0,
    tasks: Sequence[str] = DEFAULT_TASKS,
    levels: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    split: str = "train",
    level_weights: Mapping[int, float] | None = None,
    task_weights: Mapping[str, float] | None = None,
    direct: Mapping[str, float] | None = None,
) -> Iterator[Problem]:
    """The problems of `generate_corpus` (same arguments), a direct one's solution already cut to
    its last line: for other formats of the same mix (e.g. chat, `write_chat_corpus`)."""
    if n_docs < 0:
        raise TaskError(f"n_docs must be >= 0, got {n_docs}")
    if isinstance(tasks, str):
        tasks = (tasks,)  # a lone name, not its characters
    if not tasks:
        raise TaskError("tasks must name at least one task")
    if split not in SPLITS:
        raise TaskError(f"split must be one of {SPLITS}, got {split!r}")
    per_task = _resolve_levels(tasks, levels)
    weights: dict[str, list[float]] = {}
    if level_weights is not None:
        known = {lvl for lv in per_task.values() for lvl in lv}
        stray = sorted(set(level_weights) - known)
        if stray:  # a typo would otherwise silently weigh nothing
            raise TaskError(f"level_weights: level {stray[0]!r} is not a level of the corpus "
                            f"tasks ({sorted(known)})")  # fmt: skip
        for name, lv in per_task.items():
            w = [float(level_weights.get(lvl, 0.0)) for lvl in lv]
            if any(x < 0 or x != x for x in w) or sum(w) <= 0:
                raise TaskError(
                    f"level_weights {dict(level_weights)} give task {name!r} no positive weight "
                    f"on its levels {list(lv)}"
                )
            weights[name] = w
    rng = random.Random(f"corpus|{seed}|{split}")
    names = list(per_task)
    mix = _weights("task_weights", task_weights, names)
    direct = dict(direct or {})
    for name, frac in direct.items():
        if name not in per_task or not 0 <= frac <= 1:
            raise TaskError(f"direct: {name!r}: {frac!r} must name a corpus task and a fraction "
                            "in [0, 1]")  # fmt: skip
    # its own stream, so a direct share changes no problem and no other document's mix
    style_rng = random.Random(f"corpus-style|{seed}|{split}")

    def problems() -> Iterator[Problem]:  # a closure, so the checks above run at the call
        # one stream per (task, level), opened on first use; the mixing draws use their own rng,
        # so adding a task changes the mix but never the problems another task's stream yields
        streams: dict[tuple[str, int], Iterator[Problem]] = {}
        for _ in range(n_docs):
            name = rng.choices(names, mix)[0] if mix else rng.choice(names)
            if name in weights:
                level = rng.choices(per_task[name], weights[name])[0]
            else:  # rng.choice, not choices: unweighted corpora stay as they always were
                level = rng.choice(per_task[name])
            if (name, level) not in streams:
                streams[name, level] = get_task(name).stream(split, seed, level)
            problem = next(streams[name, level])
            assert problem.split == split, "Task.stream yields only problems of its split"
            if direct.get(name) and style_rng.random() < direct[name]:
                last = problem.solution.strip().splitlines()[-1:]
                problem = dataclasses.replace(problem, solution="\n".join(last))
            yield problem

    return problems()


def _weights(what: str, weights: Mapping | None, names: list) -> list[float] | None:
    if weights is None:
        return None
    unknown = sorted(set(weights) - set(names), key=str)
    if unknown:  # a typo would otherwise silently weigh nothing
        raise TaskError(f"{what}: {unknown[0]!r} is not one of {names}")
    w = [float(weights.get(n, 0.0)) for n in names]
    if any(not x >= 0 for x in w) or sum(w) <= 0:  # `not >=` also refuses NaN
        raise TaskError(f"{what} {dict(weights)} must give {names} weights >= 0, some positive")
    return w


def write_chat_corpus(path: str | os.PathLike, n: int, seed: int = 0, **kwargs) -> int:
    """`generate_problems(n, seed, **kwargs)` as chat SFT examples (`{"messages": [...]}` per
    line, `nanoseek.tasks.format_chat`), written atomically; returns the number written.

    The same mix in the chat format: a cold start that teaches the chat template while keeping
    the model's habits (its worked and its direct answers in their corpus proportions)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for problem in generate_problems(n, seed, **kwargs):
                f.write(json.dumps({"messages": format_chat(problem)}, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def write_corpus(path: str | os.PathLike, n_docs: int, seed: int = 0, **kwargs) -> int:
    """Write `generate_corpus(n_docs, seed, **kwargs)` to `path`; returns the number written.

    `.jsonl` files get one `{"text": doc}` per line; any other suffix gets plain text with
    documents separated by a blank line. The file appears complete or not at all (written to a
    temporary name, then renamed).
    """
    path = Path(path)
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in generate_corpus(n_docs, seed, **kwargs):
                if jsonl:
                    f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                else:
                    if DOC_SEPARATOR in doc:  # a user task's solution with a blank line
                        raise TaskError(
                            f"a document contains a blank line, which separates documents in "
                            f"plain text; write {path.stem}.jsonl instead"
                        )
                    f.write((DOC_SEPARATOR if count else "") + doc)
                count += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count
