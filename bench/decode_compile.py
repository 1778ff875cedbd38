"""Does `torch.compile` pay off for the decode step on CPU? Eager against compiled pieces.

    python bench/decode_compile.py                 # batch 1, 256 new tokens, one thread
    python bench/decode_compile.py --threads 2 --new-tokens 128

Greedy decoding of the model-core benchmark model (bench/decode.py's `bench_config`, random
weights, fp32) with the inference engine, first eager, then with one piece of the decode path
(the model's own modules over the latent cache) wrapped in `torch.compile`, each in a fresh
process so the compiled functions never leak into the eager run:
    project    MLA.project: q/kv projections, norms, complex RoPE (static shapes)
    attention  MLA.attend_absorbed: absorbed attention over the cache (dynamic key length)
    layer      DecoderLayer.forward: the whole block (graph breaks at the cache and the few-token
               MoE dispatch)
Prints tokens/s of the second (warm) call, the first call's time (compilation included), and
whether the tokens equal the eager run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

from nanoseek.machine import banner

PIECES = ("eager", "project", "attention", "layer")


def run_one(piece: str, args) -> dict:
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode import bench_config

    import nanoseek
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.model.block import DecoderLayer
    from nanoseek.model.mla import MLA

    if piece == "project":
        MLA.project = torch.compile(MLA.project, dynamic=False)
    elif piece == "attention":
        MLA.attend_absorbed = torch.compile(MLA.attend_absorbed, dynamic=True)
    elif piece == "layer":
        DecoderLayer.forward = torch.compile(DecoderLayer.forward, dynamic=True)
    cfg = bench_config()
    torch.manual_seed(args.seed)
    model = nanoseek.CausalLM(cfg).eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    engine = Engine(model, max_batch_size=1, max_seq_len=16 + args.new_tokens + 4)
    t0 = time.perf_counter()
    engine.generate(ids.tolist(), params)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = engine.generate(ids.tolist(), params)[0].token_ids
    warm = time.perf_counter() - t0
    return {"tokens_per_s": args.new_tokens / warm, "first_s": first, "tokens": tokens}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--piece", choices=PIECES, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.piece:
        print(json.dumps(run_one(args.piece, args)))
        return
    print(banner())  # the machine, its matmul peaks and read bandwidth, measured now
    print(f"batch 1, prompt 16 + {args.new_tokens} new tokens, fp32, {args.threads} thread(s), "
          f"torch {torch.__version__}")  # fmt: skip
    rows = {}
    for piece in PIECES:
        cmd = [sys.executable, __file__, "--piece", piece, "--new-tokens", str(args.new_tokens),
               "--threads", str(args.threads), "--seed", str(args.seed)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[piece] = json.loads(out.strip().splitlines()[-1])
        r, base = rows[piece], rows["eager"]
        print(f"{piece:<10} {r['tokens_per_s']:7.0f} tokens/s  {r['tokens_per_s'] / base['tokens_per_s']:5.2f}x"
              f"  first call {r['first_s']:5.1f} s  tokens equal to eager: "
              f"{r['tokens'] == base['tokens']}")  # fmt: skip


if __name__ == "__main__":
    main()
