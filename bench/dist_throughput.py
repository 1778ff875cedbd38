"""Training throughput on 1 vs 2 processes, and the communication volume of one step.

    python bench/dist_throughput.py                   # 1 process, then 2 (gloo) per mesh
    python bench/dist_throughput.py --steps 10 --seq-len 256 --batch-size 8

The same model, global batch and optimizer step (pre-training's loss: main + MTP + balance
loss, AdamW, aux-free bias update) run on one process and under `torchrun --nproc-per-node 2`
with three meshes: fsdp (dp=2), ep (ep=2, dense weights replicated), fsdp+ep (ep=2, dense
weights FSDP-sharded). A step is timed from its first forward to the end of the optimizer step
(`Trainer.train_step`); the table gives the median step, global tokens/s, and the bytes each rank
passes through collectives in one step, counted by a dispatch mode that sees every c10d op:
all-gather = the gathered (full) tensor, reduce-scatter = the full input, all-to-all = the rows
sent (those a rank keeps for itself included), all-reduce = the tensor.

Every process runs `--threads` intra-op threads (default 1), so 2 processes have twice the
compute of one: 2.0x is the ideal, and the gap to it is the cost of sharding and dispatch. (On
this project's shared 2-core CPU a 2-thread single process is no fair baseline: when other jobs
hold the cores its OpenMP threads wait on each other, and its step time swings tenfold.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoseek import CausalLM, ModelConfig  # noqa: E402
from nanoseek.data.shards import Batch  # noqa: E402
from nanoseek.machine import banner  # noqa: E402
from nanoseek.train.loop import Trainer  # noqa: E402
from nanoseek.train.pretrain import PretrainOptions, make_balancer, make_loss_fn  # noqa: E402

MESHES = {
    "fsdp": ["--ep=1", "--fsdp=true"],
    "ep": ["--ep=2", "--fsdp=false"],
    "fsdp+ep": ["--ep=2", "--fsdp=true"],
}
FAMILIES = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce", "broadcast")


def bench_config() -> ModelConfig:
    """A small MoE (8 routed experts, top-2, one MTP module) that a 2-core CPU steps quickly."""
    return ModelConfig(
        vocab_size=4096, hidden_size=128, num_hidden_layers=4, first_k_dense_replace=1,
        intermediate_size=384, moe_intermediate_size=64, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=1,
        max_position_embeddings=1024, rope_scaling=None,
    )  # fmt: skip


class CommBytes(TorchDispatchMode):
    """Bytes per collective family, from every c10d / functional-collective op dispatched."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.split("::")[0] in ("c10d", "_c10d_functional", "_c10d_functional_autograd"):
            family = _family(name)
            if family is not None:
                sizes = [t.numel() * t.element_size() for t in _tensors(args)]
                self.bytes[family] += max(sizes, default=0)
        return func(*args, **(kwargs or {}))


def _family(name: str) -> str | None:
    op = name.split("::")[1].split(".")[0]
    if "wait" in op or "barrier" in op:
        return None
    for family, keys in {
        "all_gather": ("allgather", "all_gather"),
        "reduce_scatter": ("reduce_scatter",),
        "all_to_all": ("alltoall", "all_to_all"),
        "all_reduce": ("allreduce", "all_reduce"),
        "broadcast": ("broadcast",),
    }.items():
        if any(k in op for k in keys):
            return family
    return None


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


# ------------------------------------------------------------------------------ one worker
def worker(args) -> None:
    from nanoseek.dist.parallel import launch

    torch.set_num_threads(args.threads)
    opts = PretrainOptions(
        out=tempfile.mkdtemp(), batch_size=args.batch_size, seq_len=args.seq_len,
        max_steps=args.steps + args.warmup, warmup_steps=1, precision=args.precision,
        eval_every=0, save_every=10**9, plot=False, ep=args.ep, fsdp=args.fsdp,
    )  # fmt: skip
    cfg = bench_config()
    with launch(opts, cfg.n_routed_experts) as par:
        torch.manual_seed(0)
        model = par.parallelize(CausalLM(cfg), opts.precision)
        trainer = Trainer(
            model, opts, make_loss_fn(opts), None, parallel=par,
            after_step=make_balancer(opts, model, par.all_reduce_),
        )  # fmt: skip
        B, T = args.batch_size // par.world_size, args.seq_len
        g = torch.Generator().manual_seed(1 + par.rank)  # each rank its own rows
        times, comm = [], None
        for step in range(args.warmup + 1 + args.steps):
            tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
            batch = Batch(tokens, torch.zeros_like(tokens))
            if step == args.warmup:  # one counted step (counting slows it: not timed)
                with CommBytes() as counter:
                    trainer.train_step([batch])
                comm = dict(counter.bytes)
                continue
            t0 = time.perf_counter()
            trainer.train_step([batch])
            if step > args.warmup:
                times.append(time.perf_counter() - t0)
        if par.is_main:
            ms = statistics.median(times) * 1e3
            row = dict(
                procs=par.world_size, mesh=args.mesh, ms_per_step=ms,
                tokens_per_s=args.batch_size * T / (ms / 1e3), comm=comm,
            )  # fmt: skip
            print("RESULT " + json.dumps(row), flush=True)


# ------------------------------------------------------------------------------ the table
def run(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mesh", default="single", help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--fsdp", type=lambda s: s == "true", default=True, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(banner())  # the machine, its matmul peaks and read bandwidth, measured now
    common = [
        f"--steps={args.steps}", f"--warmup={args.warmup}", f"--seq-len={args.seq_len}",
        f"--batch-size={args.batch_size}", f"--precision={args.precision}",
        f"--threads={args.threads}", "--worker",
    ]  # fmt: skip
    me = os.path.abspath(__file__)
    rows = [run([sys.executable, me, *common])]
    for mesh, flags in MESHES.items():
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        rows.append(run([*torchrun, "--nproc-per-node=2", me, *common, f"--mesh={mesh}", *flags]))
    c = bench_config()
    print(
        f"model: D={c.hidden_size}, {c.num_hidden_layers} layers ({c.n_routed_experts} experts, "
        f"top-{c.num_experts_per_tok}, 1 MTP), vocab {c.vocab_size}; global batch "
        f"{args.batch_size} x {args.seq_len} tokens, {args.precision}; "
        f"{args.threads} thread(s) per process on {os.cpu_count()} cores, gloo; "
        f"median of {args.steps} steps"
    )
    head = f"{'procs':>5} {'mesh':<8} {'ms/step':>8} {'tokens/s':>9} {'vs 1':>5}  "
    print(head + "  ".join(f"{f:>14}" for f in FAMILIES) + "   (MB per rank per step)")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        comm = "  ".join(f"{r['comm'].get(f, 0) / 1e6:>14.2f}" for f in FAMILIES)
        print(
            f"{r['procs']:>5} {r['mesh']:<8} {r['ms_per_step']:>8.1f} {r['tokens_per_s']:>9.0f} "
            f"{r['tokens_per_s'] / base:>5.2f}  {comm}"
        )


if __name__ == "__main__":
    main()
