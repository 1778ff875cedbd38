"""The `nanoseek` command line: one subcommand per job, each a small `run_*` function.

    nanoseek info deepseek-v3                 # parameters, KV cache, FLOPs of a preset or dir
    nanoseek convert SRC DST --dtype fp8      # bf16/fp32/FP8 checkpoint -> another dtype
    nanoseek demo --out /tmp/tiny             # build, save, reload, check: the end-to-end smoke run
    nanoseek generate DIR --prompt 'Hi' --chat  # stream a completion (--speculative mtp)
    nanoseek routing DIR --tasks arithmetic countdown --out r/   # which experts each task uses
    nanoseek eval DIR --task addition --n 200 --k 8 --json     # held-out pass@1 / pass@k
    nanoseek rejection-sample --model DIR --task T --n-prompts 500 --samples 8 --out rs.jsonl
    nanoseek pipeline r1 --model BASE --task T --out runs/r1 --grpo.max_steps=100  # 4 stages
    nanoseek serve DIR --port 8000 --api-key KEY   # OpenAI-compatible API on 127.0.0.1
    nanoseek chat DIR                         # multi-turn chat, thinking dimmed

Adding a subcommand: write `_add_<name>(parser)` for its flags and `run_<name>(args) -> int`, and
append a `Command` to COMMANDS. Runners import heavy modules themselves, so `nanoseek info` on a
laptop never pays for what `pretrain` needs.

User errors (bad config, bad checkpoint, missing file, bad argument) end as one line
`nanoseek: error: <message>` on stderr and exit code 2, never a traceback (STYLE 7); anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nanoseek.checkpoint.accounting import Accounting, account
from nanoseek.checkpoint.io import CheckpointError
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.presets import PRESETS
from nanoseek.train.loop import TrainingDiverged

PROG = "nanoseek"
# OSError: missing file etc.; TrainingDiverged: a NaN loss, reported with the checkpoint kept
USER_ERRORS = (ConfigError, CheckpointError, OSError, ValueError, TrainingDiverged)
DTYPES = ("bf16", "fp32", "fp8")


class UsageError(Exception):
    """A bad command line; raised instead of argparse's print-usage-and-exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------ helpers
def resolve_config(source: str) -> tuple[ModelConfig, str]:
    """A preset name, a checkpoint directory, or a config.json path -> (config, description)."""
    if source in PRESETS:
        return ModelConfig.from_preset(source), f"preset '{source}'"
    if os.path.isdir(source):
        path = os.path.join(source, "config.json")
    elif os.path.isfile(source):
        path = source
    else:
        raise FileNotFoundError(
            f"{source}: neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
            "checkpoint directory"
        )
    return _config_from_file(path), path


def _config_from_file(path: str) -> ModelConfig:
    try:
        return ModelConfig.from_json_file(path)
    except ConfigError as e:  # validate() names the field; add the file it came from
        msg = str(e)
        raise ConfigError(msg if path in msg else f"{path}: {msg}") from None


def human(n: float) -> str:
    """Parameter counts: 1_234_567 -> '1.23M' (K/M/B/T in steps of 1000)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:,.2f}{suffix}"
    return f"{n:,.0f}"


def human_flops(n: float) -> str:
    """83_490_000_000 -> '83.49 GFLOP' (SI prefixes)."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {prefix}FLOP"
    return f"{n:,.0f} FLOP"


def human_bytes(n: float) -> str:
    for scale, suffix in ((1024**4, "TiB"), (1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= scale:
            return f"{n / scale:,.2f} {suffix}"
    return f"{n:,.0f} B"


def format_accounting(a: Accounting, title: str) -> str:
    """The readable table `nanoseek info` prints."""

    def row(label: str, value: str, exact: str = "") -> str:
        return f"  {label:<36}{value:>12}  {exact}".rstrip()

    def count(label: str, n: int) -> str:
        return row(label, human(n), f"{n:,}")

    lines = [title, "parameters"]
    lines += [
        count("total (main model)", a.total_params),
        count("active per token", a.active_params),
        count("MTP modules (unique)", a.mtp_params),
        count("MTP incl. embed/head copies", a.mtp_params_with_copies),
        count("checkpoint values (all tensors)", a.checkpoint_numel),
        "main model by component",
    ]
    lines += [count("  " + name.replace("_", " "), n) for name, n in a.breakdown.items()]
    b = a.kv_bytes_per_value
    lines += [
        f"KV cache per token, {b}-byte values, all layers",
        row("MLA latent (c_KV + k_rope)", f"{a.kv_cache_bytes_per_token:,} B"),
        row("full per-head K and V", f"{a.full_kv_cache_bytes_per_token:,} B"),
        row("ratio", f"{a.kv_cache_ratio:,.1f}x"),
        f"compute per token, causal context of {a.seq_len:,} tokens",
        row("forward", human_flops(a.flops_per_token)),
        row("  of which attention scores/values", human_flops(a.attn_flops_per_token)),
        row("training (3x forward)", human_flops(a.train_flops_per_token)),
        row("training incl. MTP modules", human_flops(a.train_flops_per_token_with_mtp)),
    ]
    lines += [f"note: {n}" for n in a.notes]
    return "\n".join(lines)


def _checkpoint_files(directory: str) -> list[tuple[str, int]]:
    """(file name, bytes) of every regular file in a saved checkpoint directory."""
    return [
        (name, os.path.getsize(os.path.join(directory, name)))
        for name in sorted(os.listdir(directory))
        if os.path.isfile(os.path.join(directory, name))
    ]


def _check_output_dir(path: str) -> None:
    """Saving replaces the directory wholesale: refuse anything that is not a checkpoint."""
    if os.path.isfile(path):
        raise FileExistsError(f"{path}: exists and is a file")
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileExistsError(
                f"{path}: exists, is not empty and holds no config.json; refusing to replace it"
            )


def _print_files(directory: str) -> None:
    files = _checkpoint_files(directory)
    for name, size in files:
        print(f"  {name:<40}{human_bytes(size):>14}")
    print(f"  {'total':<40}{human_bytes(sum(s for _, s in files)):>14}")


# ------------------------------------------------------------------------------ info
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="PRESET_OR_DIR", help="preset name or checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--seq-len", type=_positive_int, default=4096, help="context for the attention FLOPs"
    )


def run_info(args: argparse.Namespace) -> int:
    config, where = resolve_config(args.source)
    a = account(config, seq_len=args.seq_len)
    if args.json:
        print(json.dumps({"source": where, **a.to_dict()}, indent=2))
    else:
        print(format_accounting(a, f"{args.source} ({where}, model_type {config.model_type})"))
    return 0


# ------------------------------------------------------------------------------ convert
def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint directory (bf16, fp32 or FP8)")
    p.add_argument("dst", metavar="DST", help="output directory (replaced if a checkpoint)")
    p.add_argument("--dtype", choices=DTYPES, required=True, help="storage format of DST")


def run_convert(args: argparse.Namespace) -> int:
    from nanoseek.checkpoint.convert import convert_checkpoint

    # streams tensor by tensor: memory stays near one 5 GiB output shard, so the 671B checkpoint
    # converts on an ordinary machine (no model is built, no GPU needed for FP8)
    progress = _progress_line() if sys.stderr.isatty() else None
    try:
        s = convert_checkpoint(args.src, args.dst, args.dtype, progress=progress)
    finally:
        if progress is not None:
            print(file=sys.stderr)  # end the progress line
    summary = ", ".join(f"{n:,} {d}" for d, n in s["dtypes"].items())
    done = [f"{s['quantized']:,} quantised"] if s["quantized"] else []
    done += [f"{s['dequantized']:,} dequantised"] if s["dequantized"] else []
    print(
        f"converted {args.src}: {s['tensors_read']:,} tensors, {human_bytes(s['src_bytes'])}"
        + (f" ({', '.join(done)})" if done else "")
    )
    print(f"wrote {args.dst} as {args.dtype}: {s['tensors_written']:,} tensors ({summary})")
    if s["copied_files"]:
        print(f"copied {len(s['copied_files'])} other files: {', '.join(s['copied_files'])}")
    _print_files(args.dst)
    rate = s["src_bytes"] / max(s["seconds"], 1e-9)
    print(f"done in {s['seconds']:.1f} s ({human_bytes(rate)}/s)")
    return 0


def _progress_line() -> Callable[[int, int], None]:
    """One stderr line, rewritten in place (carriage return) at most twice a second."""
    t0 = last = time.perf_counter()

    def show(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last < 0.5 and done < total:
            return
        last = now
        pct = 100 * done / max(total, 1)
        msg = f"converting: {human_bytes(done)} of {human_bytes(total)} ({pct:.0f}%)"
        print(f"\r{msg}, {now - t0:.0f} s", end="", file=sys.stderr, flush=True)

    return show


# ------------------------------------------------------------------------------ demo
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to save the demo checkpoint in")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    p.add_argument("--seed", type=int, default=0)


def run_demo(args: argparse.Namespace) -> int:
    """Build a seeded model, save it, load it back, check the logits agree bit for bit."""
    import torch

    from nanoseek.checkpoint.io import load, save
    from nanoseek.model.transformer import CausalLM

    _check_output_dir(args.out)
    config = ModelConfig.from_preset(args.preset)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = CausalLM(config).eval()
    save(model, args.out)
    print(f"built {args.preset} (seed {args.seed}) and saved it to {args.out}")
    reloaded = load(args.out, dtype=model.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(config.vocab_size, (2, 32), generator=gen)  # [B,T]
    with torch.no_grad():
        want, got = model(ids), reloaded(ids)
    pairs = [(want.logits, got.logits), *zip(want.mtp_logits, got.mtp_logits)]
    diff = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    ok = len(want.mtp_logits) == len(got.mtp_logits) and diff == 0.0
    print(
        f"reloaded: logits {tuple(want.logits.shape)} and {len(want.mtp_logits)} MTP head(s) "
        f"{'identical' if ok else 'DIFFER'} (max |diff| {diff:.3g})"
    )
    print()
    print(format_accounting(account(config), f"{args.preset} (saved to {args.out})"))
    print("saved files")
    _print_files(args.out)
    print(f"demo {'passed' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


# ------------------------------------------------------------------------------ pretrain
def _add_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML/JSON file of options (see nanoseek/train/pretrain.py)")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, plots, model/)")
    p.add_argument(
        "--data",
        nargs="+",
        help="training files (.txt/.jsonl/.parquet); default: the built-in reasoning corpus",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )


def run_pretrain(args: argparse.Namespace) -> int:
    from nanoseek.train.options import build
    from nanoseek.train.pretrain import PretrainOptions, run_pretrain

    opts = build(PretrainOptions, args.config, args.overrides, out=args.out, data=args.data)
    last = run_pretrain(opts, resume=args.resume)
    val = last.get("val_loss")
    print(
        f"done: step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}"
        + (f", val loss {val:.4f}" if val is not None else "")
        + f"; model in {os.path.join(opts.out, 'model')}"
    )
    return 0


# ------------------------------------------------------------------------------ routing
def _add_routing(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint directory")
    p.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="documents (.txt/.jsonl/.parquet), one task per file, or per JSONL --label-field",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        metavar="TASK",
        help="built-in task families to generate documents for (e.g. arithmetic countdown)",
    )
    p.add_argument("--out", help="directory for routing.png (heatmap) and routing.json")
    p.add_argument(
        "--max-tokens", type=_positive_int, default=16384, help="tokens run per task (at most)"
    )
    p.add_argument("--json", action="store_true", help="print counts and scores as JSON")
    p.add_argument("--tokenizer", help="tokenizer directory (default: MODEL)")
    p.add_argument("--field", default="text", help="JSONL field / Parquet column of the text")
    p.add_argument("--label-field", default="task", help="JSONL field naming a line's task")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--top", type=_positive_int, default=3, help="experts listed per task")
    p.add_argument("--seed", type=int, default=0, help="for --tasks documents")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def run_routing(args: argparse.Namespace) -> int:
    import torch

    from nanoseek.analysis.routing import (
        collect_routing,
        format_report,
        read_labelled,
        task_documents,
        to_json,
        write_outputs,
    )
    from nanoseek.checkpoint.io import load
    from nanoseek.data.tokenizer import Tokenizer

    if not args.data and not args.tasks:
        raise ValueError("no data: give --data FILE... and/or --tasks NAME...")
    if not os.path.isdir(args.model):
        raise CheckpointError(f"{args.model}: no such checkpoint directory")
    tok_dir = args.tokenizer or args.model
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir} (pass --tokenizer DIR)")
    # everything cheap is checked before the model loads
    docs = (
        read_labelled(args.data, field=args.field, label_field=args.label_field)
        if args.data
        else {}
    )
    clash = sorted(set(docs) & set(args.tasks))
    if clash:
        raise ValueError(f"task name(s) {', '.join(clash)} given by both --data and --tasks")
    docs.update(task_documents(args.tasks, n_docs=args.max_tokens, seed=args.seed))
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    tokenizer = Tokenizer.load(tok_dir)
    model = load(args.model, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer in {tok_dir} has {tokenizer.vocab_size} ids, more than the model's "
            f"vocab_size {model.config.vocab_size}: not this model's tokenizer"
        )
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    stats = collect_routing(model, tokenizer, docs, args.max_tokens, args.batch_size, seq_len)
    written = []
    if args.out:
        written = write_outputs(stats, args.out, title=f"expert load per task: {args.model}")
    if args.json:
        print(to_json({"model": args.model, **stats.to_dict()}))
    else:
        print(f"routing of {args.model}")
        print(format_report(stats, n_top=args.top))
        for path in written:
            print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------ sft / distill
def _add_chat_data(p: argparse.ArgumentParser, task_help: str) -> None:
    p.add_argument("--config", help="TOML/JSON file of options (--key=value overrides it)")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, model/)")
    p.add_argument(
        "--data", nargs="+", help="chat JSONL ({messages} or {prompt, completion}) or text files"
    )
    p.add_argument("--task", help=task_help)
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )


def _add_sft(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory to fine-tune (with its tokenizer)")
    _add_chat_data(p, "task name or task JSONL: also train on its worked solutions (cold start)")
    p.epilog = (
        "Any field of SFTOptions (nanoseek/train/sft.py) as --key=value, e.g. --epochs=2 "
        "--lr=1e-4 --seq_len=1024 --overlong=drop --mtp_lambda=0 --task_n=2000."
    )


def run_sft(args: argparse.Namespace) -> int:
    from nanoseek.train.options import build
    from nanoseek.train.sft import SFTOptions, run_sft

    opts = build(
        SFTOptions, args.config, args.overrides,
        model=args.model, out=args.out, data=args.data, task=args.task,
    )  # fmt: skip
    last = run_sft(opts, resume=args.resume)
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
    from nanoseek.train.distill import DistillOptions, run_distill
    from nanoseek.train.options import build

    opts = build(
        DistillOptions, args.config, args.overrides,
        teacher=args.teacher, student=args.student, out=args.out, data=args.data, task=args.task,
    )  # fmt: skip
    last = run_distill(opts, resume=args.resume)
    _print_done(last, opts.out)
    return 0


# ------------------------------------------------------------------------------ grpo
def _add_grpo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory to train (with its tokenizer)")
    p.add_argument("--task", help="task name(s), comma-separated, or a task JSONL file")
    p.add_argument("--config", help="TOML/JSON file of options (--key=value overrides it)")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, reward.png, model/)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    p.epilog = (
        "Any field of GRPOOptions (nanoseek/train/grpo.py) as --key=value, e.g. "
        "--num_generations=8 --prompts_per_step=8 --max_completion_length=256 --beta=0.001 "
        "--num_iterations=2 --task_level=2 --template=short|r1zero|chat "
        '--rewards=\'{"accuracy": 1, "format": 0.1}\'.'
    )


def run_grpo(args: argparse.Namespace) -> int:
    from nanoseek.train.grpo import GRPOOptions, run_grpo
    from nanoseek.train.options import build

    opts = build(
        GRPOOptions, args.config, args.overrides, model=args.model, out=args.out, task=args.task
    )
    last = run_grpo(opts, resume=args.resume)
    acc = last.get("eval_accuracy")
    print(
        f"done: step {last.get('step')}, reward {last.get('reward', float('nan')):.3f}"
        + (f", held-out pass@1 {acc:.3f}" if acc is not None else "")
        + f"; model in {os.path.join(opts.out, 'model')}"
    )
    return 0


def _print_done(last: dict, out: str) -> None:
    val = last.get("val_loss")
    print(
        f"done: step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}"
        + (f", val loss {val:.4f}" if val is not None else "")
        + f"; model in {os.path.join(out, 'model')}"
    )


# ------------------------------------------------------------------------------ generate
def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after the eos token")
    p.add_argument("--speculative", choices=["mtp"], help="draft with the MTP module")
    p.add_argument("--num-draft", type=_positive_int, default=1, help="drafts per step (MTP)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--tokenizer", help="tokenizer directory (default: MODEL)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads (default: torch's, all cores); 1 is far faster on a busy machine",
    )


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from nanoseek.checkpoint.io import load
    from nanoseek.data.tokenizer import ASSISTANT, Tokenizer
    from nanoseek.infer import Engine, SamplingParams

    if not os.path.isdir(args.model):
        raise CheckpointError(f"{args.model}: no such checkpoint directory")
    tok_dir = args.tokenizer or args.model
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir} (pass --tokenizer DIR)")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    tokenizer = Tokenizer.load(tok_dir)
    opened = ""  # text the chat template already put in the assistant's turn (R1: "<think>\n")
    if args.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
        prompt = tokenizer.encode(text)  # the rendered template starts with bos already
        opened = text.rsplit(ASSISTANT, 1)[-1]
    else:
        prompt = tokenizer.encode(args.prompt, add_bos=True)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model, dtype=dtype, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer in {tok_dir} has {tokenizer.vocab_size} ids, more than the model's "
            f"vocab_size {model.config.vocab_size}: not this model's tokenizer"
        )
    num_draft = args.num_draft if args.speculative else 0
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=1,
        max_seq_len=len(prompt) + args.max_new_tokens + num_draft,
        speculative=args.speculative,
        num_draft=args.num_draft,
    )
    print(opened, end="", flush=True)
    t0, n, reason = time.perf_counter(), 0, None
    for delta in engine.stream([prompt], params):
        print(delta.text, end="", flush=True)
        n += len(delta.token_ids)
        reason = delta.finish_reason or reason
    seconds = time.perf_counter() - t0
    print()
    stats = f"{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s), {reason}"
    if engine.speculator is not None:
        rates = ", ".join(f"{r:.0%}" for r in engine.speculator.acceptance_rates())
        stats += f"; MTP acceptance per draft position: {rates}"
    print(stats, file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------ eval
def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--task", required=True, help="task name or task JSONL file")
    p.add_argument("--n", type=_positive_int, default=100, help="held-out problems")
    p.add_argument(
        "--k", type=_positive_int, default=1, help="samples per problem: pass@1 and pass@k"
    )
    p.add_argument(
        "--temperature", type=float, help="default: greedy for k=1, else 0.6 (R1's evaluation)"
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
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


def run_eval(args: argparse.Namespace) -> int:
    from nanoseek.eval import evaluate_checkpoint, format_result
    from nanoseek.train.sft_data import resolve_task

    task = resolve_task(args.task)  # an unknown name fails before the model loads
    result = evaluate_checkpoint(
        args.model, task, args.tokenizer, args.device, n_problems=args.n, k=args.k,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        template=args.template, seed=args.seed, level=args.level,
    )  # fmt: skip
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


# ------------------------------------------------------------------------------ rejection
def _add_rejection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory to sample from")
    p.add_argument("--task", help="task name or task JSONL file (prompts: its train split)")
    p.add_argument("--n-prompts", type=_positive_int, help="distinct problems")
    p.add_argument("--samples", type=_positive_int, help="completions per problem")
    p.add_argument("--out", help="SFT chat JSONL to write (statistics go to OUT.json)")
    p.add_argument("--config", help="TOML/JSON file of options (--key=value overrides it)")
    p.epilog = (
        "Any field of RejectionOptions (nanoseek/train/rejection.py) as --key=value, e.g. "
        "--temperature=1.0 --max_new_tokens=256 --template=chat|short --min_language=0.9 "
        "--min_readability=0.9 --level=2."
    )


def run_rejection(args: argparse.Namespace) -> int:
    from nanoseek.train.options import build
    from nanoseek.train.rejection import (
        RejectionOptions,
        format_stats,
        run_rejection,
        stats_path,
    )

    opts = build(
        RejectionOptions, args.config, args.overrides, model=args.model, task=args.task,
        n_prompts=args.n_prompts, samples=args.samples, out=args.out,
    )  # fmt: skip
    stats = run_rejection(opts)
    print(format_stats(stats))
    print(f"wrote {opts.out} and {stats_path(opts.out)}")
    if not stats["kept"]:
        warnings.warn("no sample was kept: the data file is empty", stacklevel=1)
    return 0


# ------------------------------------------------------------------------------ pipeline
def _add_pipeline(p: argparse.ArgumentParser) -> None:
    # the kinds of nanoseek.train.pipeline.KINDS, spelt out: building the parser imports no torch
    p.add_argument(
        "kind", choices=("r1-zero", "r1"), help="r1-zero: GRPO from the base; r1: four stages"
    )
    p.add_argument("--model", help="base checkpoint directory (pre-trained, with its tokenizer)")
    p.add_argument("--task", help="task name or task JSONL file")
    p.add_argument("--out", help="pipeline directory (one sub-directory per stage)")
    p.add_argument("--config", help="TOML/JSON: top-level options plus [sft] [grpo] ... tables")
    p.epilog = (
        "Options of PipelineOptions (nanoseek/train/pipeline.py) as --key=value (--eval_n=200 "
        "--eval_k=8 --level=2 --template=chat), and per stage as --SECTION.key=value with "
        "SECTION one of sft, grpo, rejection, rejection_sft, final_grpo, e.g. "
        "--sft.max_steps=300 --grpo.max_steps=100 --rejection.samples=8."
    )


def run_pipeline(args: argparse.Namespace) -> int:
    from nanoseek.train.pipeline import build_pipeline_options, run_pipeline

    opts = build_pipeline_options(
        args.config, args.overrides, model=args.model, task=args.task, out=args.out
    )
    run_pipeline(args.kind, opts)
    print(f"summary in {os.path.join(opts.out, 'summary.md')}")
    return 0


# ------------------------------------------------------------------------------ serve / chat
def _add_engine_options(p: argparse.ArgumentParser, max_batch: int | None) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: MODEL)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    if max_batch is not None:
        p.add_argument(
            "--max-batch", type=_positive_int, default=max_batch, help="sequences decoded together"
        )
    p.add_argument(
        "--max-seq-len",
        type=_positive_int,
        help="context: prompt + completion tokens per sequence (default: min(model's, 4096))",
    )
    p.add_argument("--speculative", choices=["mtp"], help="draft with the MTP module")
    p.add_argument("--num-draft", type=_positive_int, default=1, help="drafts per step (MTP)")
    p.add_argument("--seed", type=int, default=None, help="for requests without their own")


def _engine_from_args(args: argparse.Namespace):
    from nanoseek.serve.loading import load_engine

    return load_engine(
        args.model, args.tokenizer, dtype=args.dtype, device=args.device,
        max_batch_size=getattr(args, "max_batch", 1), max_seq_len=args.max_seq_len,
        speculative=args.speculative, num_draft=args.num_draft, seed=args.seed,
    )  # fmt: skip


def _add_serve(p: argparse.ArgumentParser) -> None:
    _add_engine_options(p, max_batch=16)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("NANOSEEK_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSEEK_API_KEY)",
    )
    p.add_argument("--model-name", help="the model id clients send (default: MODEL's base name)")
    p.add_argument(
        "--max-tokens", type=_positive_int, help="most new tokens per request (default: context)"
    )
    p.add_argument(
        "--max-pending",
        type=_positive_int,
        default=256,
        help="most sequences running + queued; more requests get 429",
    )
    p.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info"
    )


def run_serve(args: argparse.Namespace) -> int:
    try:
        from nanoseek.serve.app import create_app, served_name
        from nanoseek.serve.server import bind, serve
    except ImportError as e:  # an environment problem: one line, like a missing file
        raise OSError(
            f"nanoseek serve needs fastapi and uvicorn (pip install fastapi uvicorn): {e}"
        ) from None

    sock = bind(args.host, args.port)  # a port in use fails here, before the model loads
    engine, tokenizer = _engine_from_args(args)
    name = served_name(args.model, args.model_name)
    app = create_app(
        engine, tokenizer, name, api_key=args.api_key, max_tokens=args.max_tokens,
        max_pending=args.max_pending,
    )  # fmt: skip
    print(
        f"serving {name!r} at http://{args.host}:{args.port}/v1 (batch {engine.max_batch_size}, "
        f"context {engine.max_seq_len}{', API key required' if args.api_key else ''})",
        file=sys.stderr,
    )
    try:
        serve(app, sock, log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down gracefully for
        pass
    return 0


def _add_chat(p: argparse.ArgumentParser) -> None:
    _add_engine_options(p, max_batch=None)  # one conversation: batch 1
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=_positive_int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (R1 uses 0.6)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--no-color", action="store_true", help="label thinking instead of dimming it")


def run_chat(args: argparse.Namespace) -> int:
    from nanoseek.infer import SamplingParams
    from nanoseek.serve.chat import ChatSession, run_chat

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed,
    )  # fmt: skip
    params.validate(vocab_size=1 << 62)  # bad values fail before the model loads
    engine, tokenizer = _engine_from_args(args)
    session = ChatSession(engine, tokenizer, params, system=args.system)
    color = False if args.no_color or os.environ.get("NO_COLOR") else None
    return run_chat(session, color=color)


# ------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    overrides: bool = False  # accepts free --key=value options for its options dataclass


COMMANDS: list[Command] = [
    Command(
        "info", "parameters, KV cache and FLOPs of a preset or checkpoint", _add_info, run_info
    ),
    Command(
        "convert", "convert a checkpoint between bf16, fp32 and FP8", _add_convert, run_convert
    ),
    Command("demo", "build, save, reload and check a small model", _add_demo, run_demo),
    Command(
        "generate",
        "stream a completion of a prompt (greedy or sampled)",
        _add_generate,
        run_generate,
    ),
    Command(
        "pretrain",
        "pre-train a model (MTP, aux-loss-free balancing)",
        _add_pretrain,
        run_pretrain,
        overrides=True,
    ),
    Command(
        "routing",
        "which experts each task's tokens use: heatmap and specialisation score",
        _add_routing,
        run_routing,
    ),
    Command(
        "sft",
        "supervised fine-tuning on chat data (assistant tokens only, packed)",
        _add_sft,
        run_sft,
        overrides=True,
    ),
    Command(
        "distill",
        "distil a teacher into a student (logit KL/JSD, on-policy, or sequence-level)",
        _add_distill,
        run_distill,
        overrides=True,
    ),
    Command(
        "grpo",
        "GRPO: RL with rule rewards on a task (R1-Zero), rollouts from the engine",
        _add_grpo,
        run_grpo,
        overrides=True,
    ),
    Command(
        "eval",
        "held-out pass@1 / pass@k, format rate and lengths of a model on a task",
        _add_eval,
        run_eval,
    ),
    Command(
        "rejection-sample",
        "sample a model on a task, keep verified, well-formed, unique answers as SFT JSONL",
        _add_rejection,
        run_rejection,
        overrides=True,
    ),
    Command(
        "pipeline",
        "post-training pipelines: r1-zero (GRPO from the base) or r1 (SFT, RL, RS+SFT, RL)",
        _add_pipeline,
        run_pipeline,
        overrides=True,
    ),
    Command(
        "serve",
        "OpenAI-compatible HTTP server (chat, completions, streaming, batching)",
        _add_serve,
        run_serve,
    ),
    Command("chat", "multi-turn chat in the terminal, thinking shown apart", _add_chat, run_chat),
]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="DeepSeek-V3 and the R1 recipe in small PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def _accepts_overrides(args: argparse.Namespace) -> bool:
    return any(c.overrides and c.run is args.run for c in COMMANDS)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nanoseek` console script and `python -m nanoseek`; returns the exit
    code (0 ok, 1 a check failed, 2 user error, 130 interrupted)."""
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra and not _accepts_overrides(args):
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        bad = [e for e in extra if not (e.startswith("--") and "=" in e)]
        if bad:
            raise UsageError(f"options must look like --key=value, got {' '.join(bad)}")
        args.overrides = extra
    except UsageError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    with warnings.catch_warnings():  # restores the global hook on exit
        warnings.showwarning = _one_line_warning
        try:
            return args.run(args)
        except USER_ERRORS as e:
            print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
