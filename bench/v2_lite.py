"""A real-size DeepSeek MoE on this machine: a DeepSeek-V2-Lite-shaped checkpoint streamed into
int8, its load time, peak memory and decode speed against the read-bandwidth roofline.

    python bench/v2_lite.py                        # cache in ~/.cache/nanoseek/v2-lite
    python bench/v2_lite.py --cache /data/v2lite --formats bf16 --new-tokens 32

The checkpoint (`nanoseek info deepseek-v2-lite`: 15.7B parameters, 2.66B active per token,
27 layers, 64 routed experts top-6 + 2 shared) is written once with random weights, as bf16
safetensors (31 GB) and in the official FP8 block format (16 GB), and reused. Each format is
then loaded in a fresh process with `load_int8` (nanoseek/infer/streamed.py: tensor by tensor
into int8 decode weights) and decoded greedily at batch 1 and 8 with the inference engine.
Printed per run: load seconds, peak resident memory (the process's high-water mark), tokens/s,
the bytes of weights one token reads at batch 1 (int8 projections, the 6 chosen experts of
each layer, the bf16 kv_b_proj and routers, one embedding row) and tokens/s as % of the
roofline = read bandwidth (measured in the same run) / those bytes.

transformers cannot load this checkpoint on a 24 GB machine: transformers 5.25's
`AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)` materialises the bf16 model,
31 GB of parameters, and the kernel's OOM killer stopped it at 23.1 GiB of anonymous memory
(measured once by hand, docs/results.md; not repeated here, since it takes the machine to its
memory limit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch

from nanoseek.config import ModelConfig
from nanoseek.machine import banner, read_bandwidth

FORMATS = ("bf16", "fp8")
NEED_GB = {"bf16": 33, "fp8": 17}  # disk for each format, with margin


# ----------------------------------------------------------------------------- the checkpoint
def write_checkpoint(directory: str, fmt: str, preset: str, seed: int = 0) -> None:
    """Random weights of the preset's shape, written one tensor at a time (never all in memory)."""
    from nanoseek.checkpoint.io import save_tensors
    from nanoseek.checkpoint.keys import hf_state_items
    from nanoseek.model.transformer import CausalLM

    config = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        meta = CausalLM(config)
    g = torch.Generator().manual_seed(seed)

    def items():
        for key, t in hf_state_items(meta):
            if key.endswith("norm.weight"):
                yield key, torch.ones(t.shape, dtype=torch.bfloat16)
            elif key.endswith("e_score_correction_bias"):
                yield key, torch.zeros(t.shape)
            else:  # the init std of V3 §4.2, fp32 draws rounded to bf16
                yield key, (torch.randn(t.shape, generator=g) * 0.006).to(torch.bfloat16)

    t0 = time.perf_counter()
    save_tensors(items(), config.replace(torch_dtype="bfloat16"), directory,
                 torch.bfloat16, fp8=fmt == "fp8", max_shard_bytes=2 * 1024**3)  # fmt: skip
    print(f"wrote {directory} in {time.perf_counter() - t0:.0f} s", flush=True)


def ensure(cache: str, fmt: str, preset: str) -> str:
    directory = os.path.join(cache, fmt)
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    os.makedirs(cache, exist_ok=True)
    free = shutil.disk_usage(cache).free / 1e9
    if free < NEED_GB[fmt]:
        sys.exit(f"{cache}: {free:.0f} GB free, the {fmt} checkpoint needs ~{NEED_GB[fmt]} GB")
    write_checkpoint(directory, fmt, preset)
    return directory


# ----------------------------------------------------------------------------- one run (child)
def bytes_per_token(model, weights) -> int:
    """Weights one token reads at batch 1: every int8 copy but the routed experts, K/E of the
    routed experts, kv_b_proj as W_UK / W_UV (int8 where the native kernels run, else bf16),
    routers and norms, one embedding row."""
    c = model.config
    total = 0
    for e in weights._entries.values():
        v = e.value
        nbytes = sum(t.nbytes for t in v) if isinstance(v, tuple) else v.nbytes
        routed = e.kind == "t" and e.weights[0].dim() == 3
        total += nbytes * c.num_experts_per_tok // c.n_routed_experts if routed else nbytes
    for name, p in model.named_parameters():
        if p.is_meta or "embed_tokens" in name:
            continue
        if "kv_b_proj" in name and ("absorbed", id(p)) in weights._entries:
            continue  # counted as its absorbed copies
        total += p.numel() * p.element_size()
    return total + c.hidden_size * model.dtype.itemsize


def run_one(args) -> dict:
    from nanoseek.infer import Engine, SamplingParams
    from nanoseek.infer.streamed import load_int8

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, weights = load_int8(os.path.join(args.cache, args.child), torch.bfloat16)
    load_s = time.perf_counter() - t0
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    out = {"format": args.child, "load_s": load_s, "peak_rss_gib_after_load": rss_load}
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    for batch in args.batches:
        ids = torch.randint(10, cfg.vocab_size, (batch, 16), generator=g).tolist()
        engine = Engine(model, max_batch_size=batch, max_seq_len=16 + args.new_tokens + 4,
                        weights=weights)  # fmt: skip
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        engine.generate(ids, SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
        t0 = time.perf_counter()
        engine.generate(ids, params)
        secs = time.perf_counter() - t0
        out[f"tokens_per_s_b{batch}"] = batch * args.new_tokens / secs
        del engine
    out["bytes_per_token"] = bytes_per_token(model, weights)
    out["int8_gib"] = weights.nbytes() / 2**30  # the decode copies (int8, W_UK / W_UV)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/nanoseek/v2-lite"))
    p.add_argument("--preset", default="deepseek-v2-lite", help="the shape (a smaller one to try)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--write-only", action="store_true", help="write the checkpoints, measure nothing"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # one format's run, in a fresh process
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args)))
        return
    if args.write_only:
        for fmt in args.formats:
            ensure(args.cache, fmt, args.preset)
        return
    torch.set_num_threads(args.threads)
    print(banner())
    bw = read_bandwidth()
    print(f"read bandwidth at {args.threads} thread(s): {bw / 1e9:.1f} GB/s")
    for fmt in args.formats:
        ensure(args.cache, fmt, args.preset)
        cmd = [sys.executable, __file__, "--child", fmt, "--cache", args.cache,
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
               "--batches", *map(str, args.batches)]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"{fmt}: failed\n{r.stderr[-3000:]}")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        roof = bw / res["bytes_per_token"]
        print(f"\n{fmt} checkpoint -> int8: load {res['load_s']:.0f} s, int8 weights "
              f"{res['int8_gib']:.1f} GiB, peak RSS {res['peak_rss_gib_after_load']:.1f} GiB "
              f"after load, {res['peak_rss_gib']:.1f} GiB after decoding")  # fmt: skip
        print(f"  bytes read per token (batch 1): {res['bytes_per_token'] / 1e9:.2f} GB; "
              f"roofline {roof:.1f} tokens/s")  # fmt: skip
        for b in args.batches:
            tps = res[f"tokens_per_s_b{b}"]
            note = f" = {tps / roof:.0%} of the batch-1 roofline" if b == 1 else ""
            print(f"  batch {b}: {tps:.2f} tokens/s{note}")


if __name__ == "__main__":
    main()
