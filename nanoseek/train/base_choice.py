"""Choose the RL starting point among pre-training checkpoints by measured accuracy.

    from nanoseek.train.base_choice import choose_base
    choice = choose_base("runs/pretrain", "sum", level=2, max_pass1=0.35)
    choice["model"], choice["step"], choice["checked"]

RL with rule rewards sharpens what a model can already sample [R1 §2.2]: it needs a base that
solves a task sometimes, not always and not never. How far a small model has got at a given step
is not a property of the step: the point where it learns a skill in a sudden drop of the loss
moves with the seed and with float rounding. So the base is chosen by what it does: the newest
checkpoint whose pass@1 on **train-split** problems (never the held-out ones the report
measures) is at most `max_pass1`. Checkpoints are tried newest first and the scan stops at the
first that qualifies, so a run whose final model qualifies evaluates one checkpoint.

The chosen weights (config, safetensors, tokenizer) are copied to OUT/base/ and the measured
accuracies are cached in OUT/base/choice.json, so a re-run evaluates nothing again.
"""

from __future__ import annotations

import json
import os

import torch

from nanoseek.checkpoint.io import load
from nanoseek.checkpoint.trainer_state import checkpoint_dirs
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.eval.evaluate import R1_EVAL_TEMPERATURE, resolve
from nanoseek.eval.sampling import sample_problems, score_samples
from nanoseek.fsio import copy_dir, write_json

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def train_split_accuracy(model_dir: str, task: str, level: int | None, n: int, k: int,
                         template: str, max_new_tokens: int, seed: int) -> dict:  # fmt: skip
    """pass@1 and pass@k of `model_dir` on `n` distinct train-split problems, k samples each at
    R1's evaluation temperature 0.6, through the path `nanoseek eval` takes (sampling.py)."""
    t = resolve(task)
    problems = t.generate(n, "train", seed=seed, level=level, unique=True)
    model, tok = load(model_dir, dtype=torch.float32), Tokenizer.load(model_dir)
    samples = sample_problems(model, tok, problems, k, template=template,
                              temperature=R1_EVAL_TEMPERATURE, max_new_tokens=max_new_tokens,
                              seed=seed)  # fmt: skip
    r = score_samples(t.verify_completion, samples, k)
    return {"pass@1": r["accuracy"], "pass@k": r["pass@k"], "k": k, "n": len(problems)}


def choose_base(
    run_dir: str,
    task: str,
    level: int | None = None,
    max_pass1: float = 0.35,
    *,
    out: str | None = None,
    min_step: int = 0,
    n: int = 100,
    k: int = 4,
    template: str = "short",
    max_new_tokens: int = 128,
    seed: int = 0,
    log=print,
) -> dict:
    """The newest checkpoint under `run_dir`/checkpoints (step >= `min_step`) whose train-split
    pass@1 is <= `max_pass1`, copied to `out` (default `run_dir`/base). Where none qualifies, the
    one with the lowest pass@1, with `qualified` False. Returns {model, step, pass@1, pass@k,
    qualified, max_pass1, checked: {step: {pass@1, pass@k}}}."""
    if not 0.0 <= max_pass1 <= 1.0:
        raise ValueError(f"max_pass1 must lie in [0, 1], got {max_pass1}")
    out = out or os.path.join(run_dir, "base")
    cache = os.path.join(out, "choice.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            done = json.load(f)
        same = done.get("max_pass1") == max_pass1
        if same and os.path.isfile(os.path.join(done.get("model", ""), "config.json")):
            return done
    candidates = [(s, p) for s, p in checkpoint_dirs(run_dir) if s >= min_step]
    if not candidates:
        raise FileNotFoundError(f"no checkpoints at or after step {min_step} in {run_dir}")
    checked: dict[str, dict] = {}
    picked = None
    log(f"choosing the base: the newest checkpoint with train-split pass@1 <= {max_pass1:.0%} "
        f"({n} problems x {k} samples, T 0.6)")  # fmt: skip
    for step, path in reversed(candidates):
        r = train_split_accuracy(path, task, level, n, k, template, max_new_tokens, seed)
        checked[str(step)] = {"pass@1": r["pass@1"], "pass@k": r["pass@k"]}
        hit = r["pass@1"] <= max_pass1
        log(f"  step {step:>6}: pass@1 {r['pass@1']:6.1%}  pass@{k} {r['pass@k']:6.1%}"
            + ("  <- chosen" if hit else ""))  # fmt: skip
        if hit:
            picked = (step, path)
            break
    if picked is None:
        step = min(checked, key=lambda s: checked[s]["pass@1"])
        picked = (int(step), dict(candidates)[int(step)])
        log(f"  none qualifies: step {step}, the lowest")
    step, path = picked
    copy_dir([os.path.join(path, f) for f in MODEL_FILES if os.path.isfile(os.path.join(path, f))],
             out)  # fmt: skip
    result = {
        "model": out,
        "step": step,
        **checked[str(step)],
        "qualified": checked[str(step)]["pass@1"] <= max_pass1,
        "max_pass1": max_pass1,
        "checked": checked,
    }
    write_json(cache, result)  # written last: the copy is whole
    return result
