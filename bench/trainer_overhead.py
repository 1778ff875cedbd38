"""The trainer's own overhead: `nanoseek pretrain` against a bare training step, same model.

    python bench/trainer_overhead.py                # 30 steps each, bf16 autocast
    python bench/trainer_overhead.py --steps 50 --threads 1

Runs `run_pretrain` (the code behind `nanoseek pretrain`: packed token shards, bf16 autocast
with fp32 master weights, auxiliary-loss-free bias updates from the step's load counters, the
sequence-wise balance loss, gradient clipping, the LR schedule, MaxVio and expert-load
metrics, metrics.jsonl, the progress bar) on the model-core benchmark config
(bench/train_step.py, vocabulary from the trained tokenizer), then, in the same process, a bare
loop on the same model config and batch shape: forward with labels, backward, AdamW, under the
same autocast. Both report the median step as tokens/s; validation and checkpoint writes are
left out of both (eval_every=0, one save at the end).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import bench_config  # noqa: E402 - the model-core benchmark's model

from nanoseek.machine import banner  # noqa: E402

SHAKESPEARE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt"
)


def bare_steps(config, batch: int, seq: int, steps: int, warmup: int, seed: int) -> list[float]:
    import nanoseek

    torch.manual_seed(seed)
    model = nanoseek.CausalLM(config).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data",
        nargs="*",
        default=[SHAKESPEARE] if os.path.isfile(SHAKESPEARE) else [],
        help="training text (default: ../shared/data/tinyshakespeare.txt when present, for a "
        "vocabulary near the benchmark's 8192; else the built-in corpus, vocabulary ~512)",
    )
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(banner())  # the machine, its matmul peaks and read bandwidth, measured now
    from nanoseek.analysis.plots import read_metrics
    from nanoseek.config import ModelConfig
    from nanoseek.train.pretrain import PretrainOptions, run_pretrain

    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = os.path.join(tmp, "config.json")
        bench_config().save_pretrained(tmp)
        out = os.path.join(tmp, "run")
        opts = PretrainOptions(
            out=out, model=cfg_path, data=args.data, data_separator="\n\n", vocab_size=8192,
            corpus_docs=20000, seq_len=args.seq,
            batch_size=args.batch, max_steps=args.warmup + args.steps, eval_every=0,
            save_every=10**6, plot=False, seed=args.seed, lr=1e-4, warmup_steps=1,
        )  # fmt: skip
        run_pretrain(opts, progress=False)
        records = read_metrics(os.path.join(out, "metrics.jsonl"))[args.warmup :]
        trainer_s = [r["step_time_s"] for r in records]
        config = ModelConfig.from_pretrained(os.path.join(out, "model"))
    # the bare loop runs twice, after the trainer and once more, so drift of the machine's
    # speed over the minute does not favour whichever ran first
    bare_s = bare_steps(config, args.batch, args.seq, args.steps, args.warmup, args.seed)
    bare_s += bare_steps(config, args.batch, args.seq, args.steps, args.warmup, args.seed + 1)
    tokens = args.batch * args.seq
    bare, trainer = tokens / statistics.median(bare_s), tokens / statistics.median(trainer_s)
    print(
        f"model-core bench config, vocab {config.vocab_size}, batch {args.batch} x {args.seq}, "
        f"bf16 autocast, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"{'bare step (fwd, bwd, clip, AdamW)':40s} {bare:8,.0f} tokens/s")
    print(f"{'nanoseek pretrain (run_pretrain)':40s} {trainer:8,.0f} tokens/s")
    print(f"trainer / bare = {trainer / bare:.3f} (overhead {1 - trainer / bare:+.1%})")


if __name__ == "__main__":
    main()
