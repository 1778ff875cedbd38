"""GRPO raises held-out accuracy of a small pre-trained model on multi-digit addition.

    python experiments/grpo_addition.py --out runs/grpo_addition            # all stages
    python experiments/grpo_addition.py --out R --base_band 0.1 0.3 --pretrain_steps 1200
    python experiments/grpo_addition.py --out R --base runs/tiny/model      # skip stages 1-2
    python experiments/grpo_addition.py --out R --max_steps=60 --lr=2e-4    # GRPOOptions fields

Stages (each skipped when its output exists, so a re-run only redoes what is missing):
1. pre-training: the `tiny` preset on the built-in corpus generator restricted to the addition
   family (levels 1-2, "short" template) for `--pretrain_steps` (1500), a checkpoint every
   `--save_every` (50) steps, all kept (with 800 steps no checkpoint reached 15%: see the README);
2. the starting point, picked by accuracy, not by step: GRPO needs a model that solves some sums
   but far from all (reward curves rise only from pass@k > 0, and GRPO's gain is mostly moving
   pass@1 towards pass@k: DeepSeekMath's RL lifted Maj@K, not Pass@K; a fully trained base
   leaves little to sharpen, a sparse-reward one collapses). The checkpoints are evaluated in
   step order on `--select_n` (100) TRAIN-split problems (the test split stays unseen until
   stage 3), pass@1 = mean of 4 samples at temperature 0.6, top-p 0.95, and the first whose
   pass@1 lies in `--base_band` (0.15 0.45) is the base. None in the band stops the run with
   the accuracies found (raise --pretrain_steps, lower --save_every); OUT/selection.json keeps
   them;
3. held-out evaluation of the base at `--level`, on `--eval_n` test-split problems (never seen in
   pre-training or RL): greedy pass@1; pass@1 as DeepSeek-R1 reports it (mean over 8 samples
   at temperature 0.6, top-p 0.95) with pass@8; pass@1 / pass@8 at the rollout temperature;
4. GRPO (`nanoseek.train.grpo.run_grpo`) on train-split problems at `--level`, timed;
5. the same evaluation of the GRPO model, and a table: before, after, the gain, the minutes.

OUT/results.json holds the numbers, OUT/grpo/reward.png the reward curve and
OUT/grpo/eval_accuracy.png the held-out pass@1 during training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from nanoseek.eval.evaluate import heldout_across
from nanoseek.train.grpo import GRPOOptions, run_grpo
from nanoseek.train.grpo_rollouts import Rollouts, evaluate_heldout
from nanoseek.train.options import build

TASK = "addition"
# GRPO settings found for this task on a 2-core CPU (see the README's GRPO section)
GRPO_DEFAULTS = dict(
    num_generations=8, prompts_per_step=16, max_completion_length=96, temperature=1.0,
    lr=2e-4, warmup_steps=5, beta=0.0, num_iterations=1, max_steps=150, eval_every=25,
    eval_n=100, save_every=25, batch_size=16, rewards={"accuracy": 1.0, "format": 0.1},
)  # fmt: skip


def pretrain_base(out: str, steps: int, seed: int, save_every=50, keep_last=20) -> str:
    """The tiny preset on addition documents (levels 1-2) from the built-in corpus generator.

    Why so narrow: the model must learn to copy the operands out of the question before any
    arithmetic can be right, and on the mixed corpus the tiny model's loss sits on a plateau
    with every digit at ~2.3 nats (no copying) for hundreds of steps. Short, uniform documents
    give many more copy events per step. WSD keeps the peak learning rate until the last 20%
    (a cosine decay had lowered it before the copying circuit formed). A checkpoint every
    `save_every` steps, the newest `keep_last` kept (0: all)."""
    from nanoseek.data.corpus import write_corpus
    from nanoseek.train.pretrain import PretrainOptions, run_pretrain

    model_dir = os.path.join(out, "model")
    if os.path.exists(os.path.join(model_dir, "config.json")):
        return model_dir
    os.makedirs(out, exist_ok=True)
    corpus = os.path.join(out, "addition_corpus.jsonl")
    if not os.path.exists(corpus):
        write_corpus(corpus, 30_000, seed=seed, tasks=(TASK,), levels=[1, 2])
    opts = PretrainOptions(
        out=out, model="tiny", data=[corpus], vocab_size=1024, seq_len=128, batch_size=16,
        max_steps=steps, warmup_steps=20, lr=3e-3, lr_schedule="wsd", eval_every=100,
        save_every=save_every, keep_last=keep_last, seed=seed,
    )  # fmt: skip
    run_pretrain(opts, resume=True)
    return model_dir


def load_model(model_dir: str):
    from nanoseek import load
    from nanoseek.data.tokenizer import Tokenizer

    return load(model_dir, dtype=torch.float32), Tokenizer.load(model_dir)


def pick_base(base_out: str, band: tuple[float, float], level: int, n: int, opts: GRPOOptions,
              seed: int, path: str) -> str:  # fmt: skip
    """The first pre-training checkpoint (in step order) whose pass@1 on `n` train-split problems
    (4 samples at T 0.6, top-p 0.95) lies in `band`; SystemExit naming the accuracies when none
    does. Accuracies are cached in `path`, so a re-run evaluates only new checkpoints."""
    from nanoseek.checkpoint.trainer_state import checkpoint_dirs
    from nanoseek.tasks import get_task

    # selection must not see the held-out problems: the train split only
    problems = get_task(TASK).generate(n, "train", seed=seed, level=level, unique=True)
    found = json.load(open(path)) if os.path.exists(path) else {}
    lo, hi = band
    print(f"choosing the base: first checkpoint with train-split pass@1 in [{lo:g}, {hi:g}] "
          f"({n} problems x 4 samples, T 0.6)")  # fmt: skip
    for step, ckpt in checkpoint_dirs(base_out):
        if str(step) not in found:
            model, tok = load_model(ckpt)
            r = evaluate_heldout(Rollouts(model, tok.stop_ids, 256), tok, problems,
                                 dataclasses.replace(opts, top_p=0.95), samples=4,
                                 temperature=0.6, seed=seed + 3)  # fmt: skip
            found[str(step)] = {"pass@1": r["accuracy"], "pass@4": r["pass@4"], "path": ckpt}
            with open(path, "w") as f:
                json.dump(found, f, indent=2)
        acc = found[str(step)]["pass@1"]
        hit = lo <= acc <= hi
        print(f"  step {step:>5}: pass@1 {acc:6.1%}  pass@4 {found[str(step)]['pass@4']:6.1%}"
              + ("  <- picked" if hit else ""))  # fmt: skip
        if hit:
            return ckpt
    seen = ", ".join(f"step {k} {v['pass@1']:.1%}" for k, v in found.items())
    raise SystemExit(f"no pre-training checkpoint has train-split pass@1 in [{lo:g}, {hi:g}] "
                     f"(found: {seen or 'no checkpoints'}); raise --pretrain_steps or lower "
                     "--save_every, or widen --base_band")  # fmt: skip


def evaluate_dir(model_dir: str, level: int, n: int, opts: GRPOOptions, seed: int) -> dict:
    """Held-out (test split) accuracy three ways: greedy pass@1; pass@1 as DeepSeek-R1 reports it
    (mean correctness of k=8 samples per problem at temperature 0.6, top-p 0.95) with pass@8 from
    the same samples; and pass@1 / pass@8 at the rollout temperature (`opts.temperature`)."""
    from nanoseek.tasks import get_task

    model, tok = load_model(model_dir)
    problems = heldout_across([get_task(TASK)], n, seed, level)
    rollouts = Rollouts(model, tok.stop_ids, 256)
    greedy = evaluate_heldout(rollouts, tok, problems, opts)
    r1 = evaluate_heldout(rollouts, tok, problems, dataclasses.replace(opts, top_p=0.95),
                          samples=8, temperature=0.6, seed=seed + 1)  # fmt: skip
    sampled = evaluate_heldout(rollouts, tok, problems, opts, samples=8,
                               temperature=opts.temperature, seed=seed + 2)  # fmt: skip
    return {
        "pass@1_greedy": greedy["accuracy"],
        "pass@1_t0.6": r1["accuracy"],
        "pass@8_t0.6": r1["pass@8"],
        f"pass@1_t{opts.temperature:g}": sampled["accuracy"],
        f"pass@8_t{opts.temperature:g}": sampled["pass@8"],
        "format_greedy": greedy["format"],
        "mean_length": greedy["mean_length"],
        "n": len(problems),
        "model": model_dir,
    }


def cached(path: str, fn):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    value = fn()
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
    return value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/grpo_addition")
    p.add_argument("--base", help="a pre-trained model directory (skips stages 1-2)")
    p.add_argument("--pretrain_steps", type=int, default=1500)
    p.add_argument("--save_every", type=int, default=50, help="pre-training checkpoint spacing")
    p.add_argument("--base_band", type=float, nargs=2, default=(0.15, 0.45), metavar=("LO", "HI"),
                   help="train-split pass@1 the starting checkpoint must have")  # fmt: skip
    p.add_argument("--select_n", type=int, default=100, help="train-split problems per checkpoint")
    p.add_argument("--level", type=int, default=2, help="digits per operand of the RL problems")
    p.add_argument("--eval_n", type=int, default=200, help="held-out problems per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (see below)")
    args, overrides = p.parse_known_args(argv)
    # On a CPU shared with other jobs, one thread per process: with two, OpenMP threads spin
    # waiting for a core that another job holds (measured: decode 8x, a training step 4-10x
    # slower on the shared 2-core machine than with one thread).
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    t0 = time.perf_counter()
    base_out = os.path.join(args.out, "base")
    final = args.base or pretrain_base(base_out, args.pretrain_steps, args.seed, args.save_every,
                                       keep_last=0)  # fmt: skip
    pretrain_min = (time.perf_counter() - t0) / 60
    # keyword values win over --key=value overrides in `build`, so pass only the defaults that
    # the command line does not override
    given = {o.lstrip("-").partition("=")[0].replace("-", "_") for o in overrides}
    fixed = {**GRPO_DEFAULTS, "model": final, "out": os.path.join(args.out, "grpo"),
             "task": [TASK], "task_level": args.level, "seed": args.seed}  # fmt: skip
    opts = build(GRPOOptions, None, overrides, **{k: v for k, v in fixed.items() if k not in given})
    band = tuple(args.base_band)
    base = args.base or pick_base(base_out, band, args.level, args.select_n, opts, args.seed,
                                  os.path.join(args.out, "selection.json"))  # fmt: skip
    opts = dataclasses.replace(opts, model=base)
    before = cached(os.path.join(args.out, "eval_base.json"),
                    lambda: evaluate_dir(base, args.level, args.eval_n, opts, args.seed))  # fmt: skip
    if before.get("model", base) != base:
        raise SystemExit(f"{args.out} holds a run from base {before['model']}, not {base}: "
                         "use a new --out")  # fmt: skip
    print("base:", json.dumps(before))

    timing = os.path.join(args.out, "grpo_time.json")
    if not os.path.exists(os.path.join(opts.out, "model", "config.json")):
        t1 = time.perf_counter()
        run_grpo(opts, resume=True)
        with open(timing, "w") as f:  # a resumed run reports the time of its last part only
            json.dump({"minutes": (time.perf_counter() - t1) / 60}, f)
    grpo_min = json.load(open(timing))["minutes"] if os.path.exists(timing) else float("nan")
    after = cached(os.path.join(args.out, "eval_grpo.json"),
                   lambda: evaluate_dir(os.path.join(opts.out, "model"), args.level,
                                        args.eval_n, opts, args.seed))  # fmt: skip
    print("grpo:", json.dumps(after))

    keys = [k for k in before if k.startswith("pass@")] + ["format_greedy"]
    print(f"\naddition level {args.level}, {after['n']} held-out problems")
    print(f"{'metric':<16} {'base':>7} {'GRPO':>7} {'gain':>7}")
    for k in keys:
        print(f"{k:<16} {before[k]:>7.3f} {after[k]:>7.3f} {after[k] - before[k]:>+7.3f}")
    wall_min = (time.perf_counter() - t0) / 60
    print(f"base: {base}\nGRPO: {opts.max_steps} steps in {grpo_min:.1f} min; this invocation "
          f"{wall_min:.1f} min (pre-training {pretrain_min:.1f}); curve: "
          f"{os.path.join(opts.out, 'reward.png')}")  # fmt: skip
    selection = os.path.join(args.out, "selection.json")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"level": args.level, "base": base, "band": args.base_band,
                   "selection": json.load(open(selection)) if os.path.exists(selection) else None,
                   "before": before, "after": after, "grpo_minutes": grpo_min,
                   "wall_minutes": wall_min, "options": overrides}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
