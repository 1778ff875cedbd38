"""Logit distillation from a stronger teacher beats training the same student on the same data.

    python experiments/distill_vs_sft.py --out runs/distill_exp
    python experiments/distill_vs_sft.py --out R --steps 400 --teacher runs/grpo_addition/base1500/model

Set-up (everything but the teacher's logits identical between the two runs):
- teacher: a pre-trained `tiny` model (4 layers) that solves multi-digit addition, by default
  runs/grpo_addition/base1500/model (`python experiments/grpo_addition.py --pretrain_steps 1500`);
- student: a smaller config from the `tiny` preset (`--student_layers` layers instead of 4, no
  MTP module), freshly initialised ONCE with `--seed` and saved, so both runs start from the
  same weights;
- data: addition documents in the teacher's pre-training format ("short" template, levels 1-2,
  train split of the task), the same file, batches, order, steps and learning-rate schedule;
  validation: documents from the task's TEST split;
- run A, "sft": plain next-token cross-entropy (`nanoseek.train.sft.run_sft`);
- run B, "distill": logit distillation, forward KL(teacher || student) on every token, no
  hard-label term (`nanoseek.train.distill.run_distill`, ce_weight 0).

Reported for the teacher and both students: validation cross-entropy on the held-out documents
(the same batches; for run B this is the plain CE too, so it compares directly), and held-out
task accuracy (`nanoseek.eval.evaluate.evaluate_checkpoint`, greedy pass@1 on `--eval_n`
level-2 test-split problems). OUT/results.json holds the numbers, OUT/loss_curves.png the two
validation curves.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

TASK = "addition"
LEVELS = (1, 2)  # of the training documents
EVAL_LEVELS = (2,)  # level 1 has only 2 distinct held-out sums: too few to measure


def write_data(out: str, n_train: int, n_val: int, seed: int) -> tuple[str, str]:
    from nanoseek.data.corpus import write_corpus

    train, val = os.path.join(out, "train.jsonl"), os.path.join(out, "val.jsonl")
    if not os.path.exists(train):
        write_corpus(train, n_train, seed=seed, tasks=(TASK,), levels=list(LEVELS))
    if not os.path.exists(val):
        write_corpus(val, n_val, seed=seed, tasks=(TASK,), levels=list(LEVELS), split="test")
    return train, val


def write_val2(out: str, n: int, seed: int) -> str:
    """Level-2 test-split documents: level 1 has only 2 distinct held-out sums, which then fill
    half of the mixed validation file (one confident mistake on them dominates its loss)."""
    from nanoseek.data.corpus import write_corpus

    path = os.path.join(out, "val_level2.jsonl")
    if not os.path.exists(path):
        write_corpus(path, n, seed=seed, tasks=(TASK,), levels=[2], split="test")
    return path


def make_student(out: str, teacher_dir: str, layers: int, seed: int) -> str:
    """The tiny preset with fewer layers and no MTP, initialised once and saved (with the
    teacher's tokenizer), so the SFT and the distillation run start from the same weights."""
    from nanoseek.checkpoint.io import load, save
    from nanoseek.config import ModelConfig
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.train.distill import build_student
    from nanoseek.train.sft import copy_tokenizer

    path = os.path.join(out, "student_init")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "student_config.json")
    cfg = ModelConfig.from_preset("tiny").replace(
        num_hidden_layers=layers, num_nextn_predict_layers=0
    )
    with open(cfg_path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    tokenizer = Tokenizer.load(teacher_dir)
    torch.manual_seed(seed)
    student = build_student(cfg_path, load(teacher_dir, dtype=torch.float32).config, tokenizer)
    save(student, path, extra_files=copy_tokenizer(teacher_dir, out))
    return path


def n_params(model_dir: str) -> int:
    from nanoseek.checkpoint.io import load

    return sum(p.numel() for p in load(model_dir, dtype=torch.float32).parameters())


def accuracy(model_dir: str, n: int, seed: int) -> dict:
    from nanoseek.eval.evaluate import evaluate_checkpoint

    out = {}
    for level in EVAL_LEVELS:
        r = evaluate_checkpoint(model_dir, TASK, n_problems=n, k=1, template="short",
                                level=level, max_new_tokens=96, seed=seed)  # fmt: skip
        out[f"pass@1_level{level}"] = r["accuracy"]
        out[f"format_level{level}"] = r["format_rate"]
    return out


@torch.no_grad()
def heldout_ce(model_dir: str, val_path: str, batch: int = 64) -> dict:
    """Cross-entropy on held-out documents: over all tokens after bos ("full"), and over the
    answer part only ("answer": the tokens after "Assistant: <think>", eos included). The
    question's operands are random, so the full loss has a floor set by them that every model
    nearly reaches; the answer part is what the task tests."""
    from nanoseek.checkpoint.io import load
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.model.loss import IGNORE_INDEX, lm_loss

    model, tok = load(model_dir, dtype=torch.float32).eval(), Tokenizer.load(model_dir)
    rows = []
    with open(val_path) as f:
        for line in f:
            text = json.loads(line)["text"]
            cut = text.index("<think>") + len("<think>")
            ids = tok.encode(text, add_bos=True, add_eos=True)
            prompt = tok.encode(text[:cut], add_bos=True)
            assert ids[: len(prompt)] == prompt
            rows.append((ids, len(prompt)))
    sums = {"full": [0.0, 0], "answer": [0.0, 0]}
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        L = max(len(ids) for ids, _ in part)
        x = torch.full((len(part), L), tok.pad_id, dtype=torch.long)
        ys = {k: torch.full((len(part), L), IGNORE_INDEX, dtype=torch.long) for k in sums}
        for b, (ids, n_prompt) in enumerate(part):
            x[b, : len(ids)] = torch.tensor(ids)
            ys["full"][b, : len(ids) - 1] = torch.tensor(ids[1:])  # y[t] = x[t + 1]
            ys["answer"][b, n_prompt - 1 : len(ids) - 1] = torch.tensor(ids[n_prompt:])
        logits = model(x, mtp=False).logits
        for k, y in ys.items():
            n = int((y != IGNORE_INDEX).sum())
            sums[k][0] += lm_loss(logits, y).item() * n
            sums[k][1] += n
    return {f"val2_ce_{k}": total / count for k, (total, count) in sums.items()}


def val_curve(run_dir: str) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "val_loss" in r:
                steps.append(r["step"])
                losses.append(r["val_loss"])
    return steps, losses


def plot(curves: dict, teacher_loss: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, marker="o", label=name)
    ax.axhline(teacher_loss, color="gray", ls="--", label="teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title("student on held-out addition documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/distill_exp")
    p.add_argument("--teacher", default="runs/grpo_addition/base1500/model")
    p.add_argument("--student_layers", type=int, default=2, help="the tiny preset has 4")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--loss", default="forward_kl", help="forward_kl | reverse_kl | jsd")
    p.add_argument("--ce_weight", type=float, default=0.0,
                   help="distill run: + this x the hard-label CE (Hinton's mix); 0: pure KD")  # fmt: skip
    p.add_argument("--n_train", type=int, default=20_000, help="training documents")
    p.add_argument("--eval_n", type=int, default=200, help="held-out level-2 problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # one thread per process on a shared CPU
    os.makedirs(args.out, exist_ok=True)

    from nanoseek.train.distill import DistillOptions, run_distill
    from nanoseek.train.sft import SFTOptions, run_sft

    train, val = write_data(args.out, args.n_train, 1000, args.seed)
    val2 = write_val2(args.out, 1000, args.seed)
    student = make_student(args.out, args.teacher, args.student_layers, args.seed)
    # identical data, schedule and seed for both runs; fp32 (bf16 autocast is slower on CPU)
    common = dict(
        data=[train], val_data=[val], seq_len=args.seq_len, batch_size=args.batch_size,
        max_steps=args.steps, lr=args.lr, lr_schedule="wsd", warmup_steps=20, weight_decay=0.1,
        eval_every=max(args.steps // 8, 1), eval_batches=8, save_every=args.steps,
        keep_last=1, mtp_lambda=0.0, precision="fp32", seed=args.seed,
    )  # fmt: skip
    runs = {
        "sft": lambda d: run_sft(SFTOptions(out=d, model=student, **common), progress=False),
        "distill": lambda d: run_distill(
            DistillOptions(out=d, teacher=args.teacher, student=student, loss=args.loss,
                           ce_weight=args.ce_weight, temperature=1.0, **common),
            progress=False,
        ),
    }  # fmt: skip
    minutes = {}
    for name, fn in runs.items():
        d = os.path.join(args.out, name)
        if not os.path.exists(os.path.join(d, "model", "config.json")):
            t0 = time.perf_counter()
            fn(d)
            minutes[name] = (time.perf_counter() - t0) / 60
            with open(os.path.join(d, "minutes.json"), "w") as f:
                json.dump({"minutes": minutes[name]}, f)
        else:
            with open(os.path.join(d, "minutes.json")) as f:
                minutes[name] = json.load(f)["minutes"]

    with open(os.path.join(args.out, "distill", "teacher_eval.json")) as f:
        teacher_val = json.load(f)["teacher_val_loss"]
    curves = {name: val_curve(os.path.join(args.out, name)) for name in runs}
    rows = {
        "teacher": {
            "val_loss": teacher_val,
            **heldout_ce(args.teacher, val2),
            "params": n_params(args.teacher),
            **accuracy(args.teacher, args.eval_n, args.seed),
        },  # fmt: skip
    }
    for name in runs:
        model_dir = os.path.join(args.out, name, "model")
        rows[name] = {"val_loss": curves[name][1][-1], **heldout_ce(model_dir, val2),
                      "params": n_params(model_dir),
                      "minutes": minutes[name], **accuracy(model_dir, args.eval_n, args.seed)}  # fmt: skip
    plot(curves, teacher_val, os.path.join(args.out, "loss_curves.png"))

    cols = [
        "val_loss",
        "val2_ce_full",
        "val2_ce_answer",
        *[f"pass@1_level{lvl}" for lvl in EVAL_LEVELS],
        "params",
        "minutes",
    ]
    print(f"\n{args.steps} steps, batch {args.batch_size} x {args.seq_len} tokens, seed {args.seed};"
          f" accuracy: greedy, {args.eval_n} test-split problems per level")  # fmt: skip
    print(f"{'model':<10}" + "".join(f"{c:>16}" for c in cols))
    for name, r in rows.items():
        cells = [f"{r[c]:>16.4f}" if isinstance(r.get(c), float) else f"{r.get(c, '-')!s:>16}"
                 for c in cols]  # fmt: skip
        print(f"{name:<10}" + "".join(cells))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": rows, "curves": curves}, f, indent=2)


if __name__ == "__main__":
    main()
