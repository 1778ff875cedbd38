"""`nanoseek pretrain`, `sft`, `distill`, `grpo`, `eval`, `rejection-sample`, `pipeline`.

The training runners take their options from a TOML/JSON `--config` plus free `--key=value`
overrides (`Command(..., overrides=True)`); each builds its options dataclass and calls the
trainer in nanoseek/train/.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

from nanoseek.cli.common import QUANTIZE_HELP, Command, nonnegative_int, positive_int
from nanoseek.eval import evaluate_checkpoint, format_result
from nanoseek.tasks.resolve import DEFAULT_EVAL_N, resolve_task
from nanoseek.train import distill, grpo, pipeline, pretrain, rejection, sft
from nanoseek.train.options import build


# ------------------------------------------------------------------------------ pretrain
def _add_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML/JSON file of options (see nanoseek/train/pretrain.py)")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, plots, model/)")
    p.add_argument(
        "--data",
        nargs="+",
        help="training files (.txt/.jsonl/.parquet); default: the built-in reasoning corpus",
    )
    _add_resume(p)


def _add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out holding a previous run, deleting its checkpoints and logs",
    )


def _overwrite(args: argparse.Namespace) -> bool | None:
    """--overwrite as a keyword for `build`: None leaves the config file's value."""
    return True if args.overwrite else None


def run_pretrain(args: argparse.Namespace) -> int:
    opts = build(
        pretrain.PretrainOptions, args.config, args.overrides, out=args.out, data=args.data,
        overwrite=_overwrite(args),
    )  # fmt: skip
    last = pretrain.run_pretrain(opts, resume=args.resume)
    _print_done(last, opts.out)
    return 0


# ------------------------------------------------------------------------------ sft / distill
def _add_chat_data(p: argparse.ArgumentParser, task_help: str) -> None:
    p.add_argument("--config", help="TOML/JSON file of options (--key=value overrides it)")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, model/)")
    p.add_argument(
        "--data", nargs="+", help="chat JSONL ({messages} or {prompt, completion}) or text files"
    )
    p.add_argument("--task", help=task_help)
    _add_resume(p)


def _add_sft(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory to fine-tune (with its tokenizer)")
    _add_chat_data(
        p,
        "task name or task JSONL: also train on its worked solutions (cold start); a file is a "
        "training set, gone through whole (--task_n=N draws N, in epochs without replacement)",
    )
    p.epilog = (
        "Any field of SFTOptions (nanoseek/train/sft.py) as --key=value, e.g. --epochs=2 "
        "--lr=1e-4 --seq_len=1024 --overlong=drop --mtp_lambda=0 --task_n=2000."
    )


def run_sft(args: argparse.Namespace) -> int:
    opts = build(
        sft.SFTOptions, args.config, args.overrides,
        model=args.model, out=args.out, data=args.data, task=args.task,
        overwrite=_overwrite(args),
    )  # fmt: skip
    last = sft.run_sft(opts, resume=args.resume)
    _print_done(last, opts.out)
    return 0


def _add_distill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher checkpoint directory (with its tokenizer)")
    p.add_argument("--student", help="student: checkpoint directory, preset name or config.json")
    _add_chat_data(p, "task name or task JSONL: its problems as data / prompts (sequence mode)")
    p.epilog = (
        "Any field of DistillOptions (nanoseek/train/distill.py) as --key=value, e.g. "
        "--mode=logit|sequence --loss=forward_kl|reverse_kl|jsd --beta=0.5 --temperature=2 "
        "--onpolicy_frac=0.5 --ce_weight=0.5 --samples_per_prompt=8 --max_new_tokens=256."
    )


def run_distill(args: argparse.Namespace) -> int:
    opts = build(
        distill.DistillOptions, args.config, args.overrides,
        teacher=args.teacher, student=args.student, out=args.out, data=args.data, task=args.task,
        overwrite=_overwrite(args),
    )  # fmt: skip
    last = distill.run_distill(opts, resume=args.resume)
    _print_done(last, opts.out)
    return 0


# ------------------------------------------------------------------------------ grpo
def _add_grpo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory to train (with its tokenizer)")
    p.add_argument("--task", help="task name(s), comma-separated, or a task JSONL file")
    p.add_argument("--config", help="TOML/JSON file of options (--key=value overrides it)")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, reward.png, model/)")
    _add_resume(p)
    p.epilog = (
        "Any field of GRPOOptions (nanoseek/train/grpo.py) as --key=value, e.g. "
        "--num_generations=8 --prompts_per_step=8 --max_completion_length=256 --beta=0.001 "
        "--num_iterations=2 --task_level=2 --template=short|r1zero|chat "
        '--rewards=\'{"accuracy": 1, "format": 0.1}\'.'
    )


def run_grpo(args: argparse.Namespace) -> int:
    opts = build(
        grpo.GRPOOptions, args.config, args.overrides, model=args.model, out=args.out,
        task=args.task, overwrite=_overwrite(args),
    )  # fmt: skip
    last = grpo.run_grpo(opts, resume=args.resume)
    summary = f"reward {last.get('reward', float('nan')):.3f}"
    if last.get("eval_accuracy") is not None:
        summary += f", held-out pass@1 {last['eval_accuracy']:.3f}"
    _print_done(last, opts.out, summary)
    return 0


def _print_done(last: dict, out: str, summary: str | None = None) -> None:
    """The closing line of a training command (under torchrun rank 0 speaks for all); the
    default summary is the loop's loss and validation loss."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if summary is None:
        val = last.get("val_loss")
        summary = f"loss {last.get('loss', float('nan')):.4f}"
        summary += f", val loss {val:.4f}" if val is not None else ""
    print(f"done: step {last.get('step')}, {summary}; model in {os.path.join(out, 'model')}")


# ------------------------------------------------------------------------------ eval
def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (with tokenizer.json)")
    p.add_argument(
        "--task",
        required=True,
        help="task name, or a task JSONL file: a test set, evaluated whole (rows with a "
        '"split" field: their test rows only)',
    )
    p.add_argument(
        "--n",
        type=nonnegative_int,
        help="held-out problems; default and 0: all of a task file's, 100 of a generated task",
    )
    p.add_argument(
        "--k", type=positive_int, default=1, help="samples per problem: pass@1 and pass@k"
    )
    p.add_argument(
        "--temperature", type=float, help="default: greedy for k=1, else 0.6 (R1's evaluation)"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument(
        "--template",
        default="chat",
        help="prompt format: chat (after SFT/RL), short (the pre-training corpus), r1zero",
    )
    p.add_argument("--level", type=int, help="task level (default: all levels)")
    p.add_argument("--seed", type=int, default=0, help="which held-out problems, and sampling")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--tokenizer", help="tokenizer directory (default: MODEL)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--quantize", choices=["int8"], help=QUANTIZE_HELP)


def run_eval(args: argparse.Namespace) -> int:
    # a file given for evaluation is a test set; an unknown name fails before the model loads
    task = resolve_task(args.task, split="test")
    n = args.n if args.n is not None else (0 if task.count("test") is not None else DEFAULT_EVAL_N)
    result = evaluate_checkpoint(
        args.model, task, args.tokenizer, args.device, n_problems=n, k=args.k,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        template=args.template, seed=args.seed, level=args.level, quantize=args.quantize,
    )  # fmt: skip
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


# ------------------------------------------------------------------------------ rejection
def _add_rejection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory to sample from")
    p.add_argument(
        "--task", help="task name or task JSONL file (prompts: its train split; all of a file)"
    )
    p.add_argument("--n-prompts", type=positive_int, help="distinct problems")
    p.add_argument("--samples", type=positive_int, help="completions per problem")
    p.add_argument("--out", help="SFT chat JSONL to write (statistics go to OUT.json)")
    p.add_argument("--config", help="TOML/JSON file of options (--key=value overrides it)")
    p.epilog = (
        "Any field of RejectionOptions (nanoseek/train/rejection.py) as --key=value, e.g. "
        "--temperature=1.0 --max_new_tokens=256 --template=chat|short --min_language=0.9 "
        "--min_readability=0.9 --level=2."
    )


def run_rejection(args: argparse.Namespace) -> int:
    opts = build(
        rejection.RejectionOptions, args.config, args.overrides, model=args.model, task=args.task,
        n_prompts=args.n_prompts, samples=args.samples, out=args.out,
    )  # fmt: skip
    stats = rejection.run_rejection(opts)
    print(rejection.format_stats(stats))
    print(f"wrote {opts.out} and {rejection.stats_path(opts.out)}")
    if not stats["kept"]:
        warnings.warn("no sample was kept: the data file is empty", stacklevel=1)
    return 0


# ------------------------------------------------------------------------------ pipeline
def _add_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "kind", choices=pipeline.KINDS, help="r1-zero: GRPO from the base; r1: four stages"
    )
    p.add_argument("--model", help="base checkpoint directory (pre-trained, with its tokenizer)")
    p.add_argument(
        "--task",
        help="task name or task JSONL file (without --eval_task, a file keeps a 10%% hash test "
        "split: every stage is evaluated on problems no stage trained on)",
    )
    p.add_argument(
        "--eval_task",
        help="task JSONL file (or name) every stage is evaluated on, whole; --task is then "
        "trained on whole",
    )
    p.add_argument("--out", help="pipeline directory (one sub-directory per stage)")
    p.add_argument("--config", help="TOML/JSON: top-level options plus [sft] [grpo] ... tables")
    p.epilog = (
        "Options of PipelineOptions (nanoseek/train/pipeline.py) as --key=value (--eval_n=200 "
        "--eval_k=8 --level=2 --template=chat), and per stage as --SECTION.key=value with "
        "SECTION one of sft, grpo, rejection, rejection_sft, final_grpo, e.g. "
        "--sft.max_steps=300 --grpo.max_steps=100 --rejection.samples=8."
    )


def run_pipeline(args: argparse.Namespace) -> int:
    opts = pipeline.build_pipeline_options(
        args.config, args.overrides, model=args.model, task=args.task, out=args.out,
        eval_task=args.eval_task,
    )  # fmt: skip
    pipeline.run_pipeline(args.kind, opts)
    print(f"summary in {os.path.join(opts.out, 'summary.md')}")
    return 0


# ------------------------------------------------------------------------------ commands
PRETRAIN = Command(
    "pretrain",
    "pre-train a model (MTP, aux-loss-free balancing)",
    _add_pretrain,
    run_pretrain,
    overrides=True,
)
SFT = Command(
    "sft",
    "supervised fine-tuning on chat data (assistant tokens only, packed)",
    _add_sft,
    run_sft,
    overrides=True,
)
DISTILL = Command(
    "distill",
    "distil a teacher into a student (logit KL/JSD, on-policy, or sequence-level)",
    _add_distill,
    run_distill,
    overrides=True,
)
GRPO = Command(
    "grpo",
    "GRPO: RL with rule rewards on a task (R1-Zero), rollouts from the engine",
    _add_grpo,
    run_grpo,
    overrides=True,
)
EVAL = Command(
    "eval",
    "held-out pass@1 / pass@k, format rate and lengths of a model on a task",
    _add_eval,
    run_eval,
)
REJECTION = Command(
    "rejection-sample",
    "sample a model on a task, keep verified, well-formed, unique answers as SFT JSONL",
    _add_rejection,
    run_rejection,
    overrides=True,
)
PIPELINE = Command(
    "pipeline",
    "post-training pipelines: r1-zero (GRPO from the base) or r1 (SFT, RL, RS+SFT, RL)",
    _add_pipeline,
    run_pipeline,
    overrides=True,
)
