"""`nanoseek info`, `convert`, `demo`: a model's size and cost, its checkpoint formats, a smoke run.

Plus the helpers they share: reading a preset or checkpoint config, human-readable counts, the
accounting table, a checkpoint directory's files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

from nanoseek.checkpoint.accounting import Accounting, account
from nanoseek.checkpoint.convert import convert_checkpoint
from nanoseek.checkpoint.io import load, save, scan
from nanoseek.cli.common import Command, positive_int
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model.transformer import CausalLM
from nanoseek.presets import PRESETS

DTYPES = ("bf16", "fp32", "fp8")


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
        "--seq-len", type=positive_int, default=4096, help="context for the attention FLOPs"
    )
    p.add_argument(
        "--scan",
        action="store_true",
        help="read every weight of a checkpoint directory: float dtype, no NaN or inf",
    )


def run_info(args: argparse.Namespace) -> int:
    config, where = resolve_config(args.source)
    a = account(config, seq_len=args.seq_len)
    if args.scan:
        if not os.path.isdir(args.source):
            raise ValueError(f"--scan reads a checkpoint directory; {args.source!r} is not one")
        s = scan(args.source)  # CheckpointError naming the file and tensor
        print(
            f"scanned {s['tensors']:,} tensors, {s['values']:,} values: all finite", file=sys.stderr
        )
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


# ------------------------------------------------------------------------------ commands
INFO = Command(
    "info", "parameters, KV cache and FLOPs of a preset or checkpoint", _add_info, run_info
)
CONVERT = Command(
    "convert", "convert a checkpoint between bf16, fp32 and FP8", _add_convert, run_convert
)
DEMO = Command("demo", "build, save, reload and check a small model", _add_demo, run_demo)
