"""Does `--compile` pay off for the main job's pre-training? Eager against compiled, interleaved.

    python bench/compile_speedup.py                       # the main job's shapes, 20 rounds
    python bench/compile_speedup.py --cold --rounds 30    # compile with an empty inductor cache
    python bench/compile_speedup.py --threads 1
    python bench/compile_speedup.py --ablate              # + compiled without parts of it

The pre-training step of `nanoseek speedrun` (nanoseek/speedrun.py): the `tiny` preset with its
vocabulary (1024), batch 16 x 128 tokens, bf16 autocast over fp32 master weights, MTP (lambda
0.3), auxiliary-loss-free balancing (expert loads counted, bias updated after every step, the
small sequence-wise loss), fused AdamW, gradient clipping - the trainer itself
(nanoseek/train/loop.py `Trainer.train_step`), on random token windows with document
boundaries. Two trainers with the same initial weights take the same batches in turns, one
step each per round (eager, compiled, eager, compiled, ...), so a machine shared with other
jobs slows both alike.

Prints the machine (`nanoseek.machine.banner()`), the compile time (dynamo + inductor +
the C++ build, forward and the lazily compiled backward; `--cold` points inductor at an empty
cache directory first, otherwise a warm cache from an earlier run may be reused, and the line
says which), median tokens/s both ways and their ratio, and the main job's pre-training time
both ways with the compile time counted (`--main-steps`, default the main job's 1500 steps).
`--ablate` adds two more compiled trainers to the rotation: "-cpp_wrapper" (inductor's wrapper
in Python) and "-loss-cpp_wrapper" (that, and the cross-entropy left to the eager chunked
Function), so what each part of `--compile` gains is measured in the same interleaved run
(compile time is then not reported: the compilers' clocks overlap).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20, help="timed steps of each trainer")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each trainer first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--cold", action="store_true", help="compile into an empty inductor cache")
    p.add_argument("--main-steps", type=int, default=1500, help="pre-training steps to project")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=1024, help="the main job's tokenizer size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--ablate", action="store_true", help="also compiled without parts of it")
    args = p.parse_args(argv)
    cache = None
    if args.cold:  # read by inductor when it first compiles: set before any compilation
        cache = tempfile.TemporaryDirectory(prefix="inductor-cold-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name

    import torch

    import nanoseek
    from nanoseek.config import ModelConfig
    from nanoseek.data.shards import Batch
    from nanoseek.machine import banner
    from nanoseek.model.compile import TrainingCompiler
    from nanoseek.model.transformer import CausalLM
    from nanoseek.train.loop import Trainer
    from nanoseek.train.pretrain import PretrainOptions, make_balancer, make_loss_fn

    warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    nanoseek.keep_freed_memory()  # what the nanoseek CLI does for every run
    print(banner(), flush=True)
    B, T = args.batch, args.seq
    cfg = ModelConfig.from_preset(args.preset).replace(
        vocab_size=args.vocab, aux_loss_alpha=1e-4, seq_aux=True
    )
    print(f"model: preset {args.preset}, vocab {args.vocab}, MTP depth "
          f"{cfg.num_nextn_predict_layers}; batch {B} x {T}, {args.precision}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {args.warmup} warm-up + "
          f"{args.rounds} timed steps each, interleaved, median", flush=True)  # fmt: skip

    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.rounds):
        tokens = torch.randint(0, args.vocab, (B, T + 1), generator=gen)
        docs = (torch.rand(B, T + 1, generator=gen) < 0.01).long().cumsum(1)  # ~100-token docs
        batches.append(Batch(tokens, docs))

    trainers = {}
    ablations = {"-cpp_wrapper": True, "-loss-cpp_wrapper": False} if args.ablate else {}
    for label in ("eager", "compiled", *ablations):
        torch.manual_seed(0)
        model = CausalLM(cfg)
        opts = PretrainOptions(out=tempfile.mkdtemp(prefix="compile-bench-"),
                               max_steps=args.main_steps, batch_size=B, seq_len=T,
                               precision=args.precision, compile=label != "eager")  # fmt: skip
        trainers[label] = Trainer(model, opts, make_loss_fn(opts), None,
                                  after_step=make_balancer(opts, model))  # fmt: skip
        if label in ablations:
            trainers[label].compiler.close()
            trainers[label].compiler = TrainingCompiler(
                model, compile_loss=ablations[label], options={"cpp_wrapper": False}
            )

    times: dict[str, list[float]] = {k: [] for k in trainers}
    first: dict[str, float] = {}
    labels = list(trainers)
    for i, batch in enumerate(batches):
        for label in labels[i % len(labels) :] + labels[: i % len(labels)]:  # rotating order
            t0 = time.perf_counter()
            trainers[label].train_step([batch])
            dt = time.perf_counter() - t0
            if i == 0:
                first[label] = dt
            elif i >= args.warmup:
                times[label].append(dt)
    compile_s = trainers["compiled"].compiler.compile_s
    losses = {k: t.train_step([batches[0]])["loss"] for k, t in trainers.items()}

    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: B * T / m for k, m in med.items()}
    where = (
        "cold (empty) cache" if args.cold else "default cache dir, may be warm from earlier runs"
    )
    if args.ablate:  # the compilers' clocks overlap: compile time is not told apart
        print(f"\nfirst step {first['compiled']:.1f} s compiled ({where}), "
              f"{first['eager']:.2f} s eager", flush=True)  # fmt: skip
    else:
        print(f"\ncompiled in {compile_s:.1f} s ({where}); first step {first['compiled']:.1f} s "
              f"compiled, {first['eager']:.2f} s eager", flush=True)  # fmt: skip
    print(f"{'':<26} {'tokens/s':>9} {'ms/step':>8} {'/ eager':>8}")
    for k in trainers:
        name = k if k in ("eager", "compiled") else "compiled " + k
        print(f"{name:<26} {tps[k]:>9,.0f} {med[k] * 1e3:>8.1f} {med['eager'] / med[k]:>7.2f}x")
    ratio = med["eager"] / med["compiled"]
    n = args.main_steps
    eager_s, compiled_s = n * med["eager"], n * med["compiled"] + compile_s
    print(f"compiled / eager tokens/s: {ratio:.2f}x")
    if not args.ablate:
        print(f"{n} pre-training steps: eager {eager_s:.0f} s, compiled {compiled_s:.0f} s "
              f"including compilation: {eager_s / compiled_s:.2f}x")  # fmt: skip
    print(f"loss after the same steps: eager {losses['eager']:.4f}, compiled "
          f"{losses['compiled']:.4f}")  # fmt: skip
    load = os.getloadavg()[0]
    if load > torch.get_num_threads() + 0.5:
        print(f"note: load average {load:.1f} on {os.cpu_count()} CPUs: other processes shared "
              "the machine; figures are provisional (ratios less affected than tokens/s)")  # fmt: skip
    if cache is not None:
        cache.cleanup()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
