"""A real-size DeepSeek MoE on this machine: a DeepSeek-V2-Lite-shaped checkpoint streamed into
int8, its load time, peak memory and decode speed against the read-bandwidth roofline.

    python bench/v2_lite.py                        # cache in ~/.cache/nanoseek/v2-lite
    python bench/v2_lite.py --cache /data/v2lite --formats bf16 --new-tokens 32
    python bench/v2_lite.py --formats fp8 --llama   # + llama.cpp on the same checkpoint

The checkpoint (`nanoseek info deepseek-v2-lite`: 15.7B parameters, 2.66B active per token,
27 layers, 64 routed experts top-6 + 2 shared) is written once with random weights, as bf16
safetensors (31 GB) and in the official FP8 block format (16 GB), and reused. Each format is
then loaded in a fresh process with `load_int8` (nanoseek/infer/streamed.py: tensor by tensor
into int8 decode weights) and decoded greedily at batch 1 and 8 with the inference engine.
Printed per run: load seconds, peak resident memory (the process's high-water mark), tokens/s,
the bytes of weights one token reads at batch 1 (int8 projections, the 6 chosen experts of
each layer, the bf16 kv_b_proj and routers, one embedding row) and tokens/s as % of the
roofline = read bandwidth (measured in the same run) / those bytes.

`--llama` also runs llama.cpp on the same checkpoint (llama-cpp-python from bench/.llama-venv,
see bench/llamacpp_setup.py): converted once with llama.cpp's own converter to q8_0 (~17 GB
beside the checkpoint; from the FP8 format the converter dequantises, then quantises), greedy
at batch 1 after the same 16-token prompt, in a process of its own with the same threads, its
tokens/s against the same roofline (q8_0 reads 34 bytes per 32 weights where nanoseek's int8
reads 32 and a bf16 scale per row) and the share of positions where the two choose the same
token. The converter needs a tokenizer: the speedrun model's (bench/vs_llamacpp.py, built once)
is copied next to the checkpoint; ids past its 1024 are padding tokens to llama.cpp, which is
fine for a bench that compares ids.

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
NEED_GB = {"bf16": 33, "fp8": 17, "q8_0": 18}  # disk for each format, with margin
PROMPT = 16  # prompt tokens


def prompt_ids(vocab_size: int, batch: int) -> list[list[int]]:
    """The prompts of a run: random ids, the same for every format and for llama.cpp."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(10, vocab_size, (batch, PROMPT), generator=g).tolist()


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
    for batch in args.batches:
        ids = prompt_ids(cfg.vocab_size, batch)
        engine = Engine(model, max_batch_size=batch, max_seq_len=PROMPT + args.new_tokens + 4,
                        weights=weights)  # fmt: skip
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        engine.generate(ids, SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
        t0 = time.perf_counter()
        done = engine.generate(ids, params)
        secs = time.perf_counter() - t0
        out[f"tokens_per_s_b{batch}"] = batch * args.new_tokens / secs
        if batch == 1:
            out["tokens_b1"] = done[0].token_ids
        del engine
    out["bytes_per_token"] = bytes_per_token(model, weights)
    out["int8_gib"] = weights.nbytes() / 2**30  # the decode copies (int8, W_UK / W_UV)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


# ----------------------------------------------------------------------------- llama.cpp
def run_llama(directory: str, args, vocab_size: int) -> dict | None:
    """llama.cpp on the checkpoint in `directory` (q8_0, converted once), batch 1; None (with
    the reason printed) where llama-cpp-python or the disk for the GGUF is missing."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import llamacpp_setup as ll
    from bench.vs_llamacpp import DEFAULT_CACHE, speedrun_model

    found = ll.find()
    if found is None:
        print("llama.cpp: llama-cpp-python is not built (python bench/llamacpp_setup.py build)")
        return None
    python, tree = found
    gguf = directory.rstrip("/") + "-q8_0.gguf"
    log = os.path.join(os.path.dirname(gguf), "llama.log")
    if not os.path.exists(gguf):
        free = shutil.disk_usage(os.path.dirname(gguf)).free / 1e9
        if free < NEED_GB["q8_0"]:
            print(f"llama.cpp: {free:.0f} GB free, the q8_0 GGUF needs ~{NEED_GB['q8_0']} GB")
            return None
        tokenizer = speedrun_model(DEFAULT_CACHE, 100)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not os.path.exists(os.path.join(directory, name)):
                shutil.copy(os.path.join(tokenizer, name), directory)
        print(f"converting {directory} with convert_hf_to_gguf.py --outtype q8_0", flush=True)
        t0 = time.perf_counter()
        ll.convert(directory, gguf, "q8_0", tree, log)
        print(f"  converted in {time.perf_counter() - t0:.0f} s", flush=True)
    worker = ll.Worker(python, log)
    try:
        t0 = time.perf_counter()
        worker.call(op="load", path=gguf, n_ctx=PROMPT + args.new_tokens + 8,
                    threads=args.threads)  # fmt: skip
        load_s = time.perf_counter() - t0
        prompt = prompt_ids(vocab_size, 1)[0]
        # the GGUF is memory-mapped: a first run of the same greedy tokens pages in every
        # weight the timed runs read (nanoseek's weights are in memory once loaded)
        worker.call(op="generate", prompt=prompt, n=args.new_tokens)
        r = min((worker.call(op="generate", prompt=prompt, n=args.new_tokens) for _ in range(2)),
                key=lambda r: r["seconds"])  # fmt: skip
    finally:
        worker.close()
    return {"load_s": load_s, "tokens_per_s_b1": args.new_tokens / r["seconds"],
            "tokens": r["tokens"], "gguf_gb": os.path.getsize(gguf) / 1e9}  # fmt: skip


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
    p.add_argument("--llama", action="store_true", help="also llama.cpp (q8_0) on each checkpoint")
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
        if args.llama:
            config = ModelConfig.from_pretrained(os.path.join(args.cache, fmt))
            ll = run_llama(os.path.join(args.cache, fmt), args, config.vocab_size)
            if ll is not None:
                tps = ll["tokens_per_s_b1"]
                ours = res.get("tokens_per_s_b1")
                same = sum(a == b for a, b in zip(ll["tokens"], res.get("tokens_b1", [])))
                print(
                    f"  llama.cpp (q8_0 GGUF {ll['gguf_gb']:.1f} GB, load {ll['load_s']:.0f} s)"
                    f": batch 1 {tps:.2f} tokens/s = {tps / roof:.0%} of the same roofline"
                    + (f"; nanoseek / llama.cpp {ours / tps:.2f}x" if ours else "")
                    + f"; same greedy token at {same}/{len(ll['tokens'])} positions"
                )


if __name__ == "__main__":
    main()
