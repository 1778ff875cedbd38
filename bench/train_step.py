"""Training-step throughput: nanoseek against transformers on the same checkpoint.

    python bench/train_step.py                    # fp32 and bf16, 10 timed steps each
    python bench/train_step.py --dtype bf16 --compile --steps 20

One random nanoseek model is saved with `nanoseek.save`; the SAME directory is loaded by
`transformers.DeepseekV3ForCausalLM.from_pretrained` and by `nanoseek.load`. A step is forward
(next-token cross-entropy on random tokens, each API's own `labels`), backward and
`AdamW.step()`, in train mode. Every step is timed with `time.perf_counter`; the table
reports the median step as ms/step and tokens/s. The implementations are timed round-robin, one
step each per round, so other jobs on a shared machine slow them alike. The optimizer is
`AdamW(lr=1e-4, fused=True)` for both: what nanoseek's trainer and transformers' `Trainer`
(`optim="adamw_torch_fused"`, its default with torch >= 2.8) build.

`--malloc keep` first calls `nanoseek.keep_freed_memory()` (what the `nanoseek` CLI does): the
process keeps freed memory instead of page-faulting its big buffers afresh every step. It is a
process setting, so both implementations run under it; without it (`system`, the default)
transformers, with more big fp32 buffers, loses more time to page faults than nanoseek.

MFU = achieved model FLOP/s over the measured matmul peak of this machine in that dtype (best of a
few large square matmuls, measured here). Model FLOPs per token = 6 x active matmul parameters
(attention projections, the dense FFN or router + K routed + shared experts, the head; not the
embedding) + attention FLOPs (QK^T and PV over the causal half, forward x3 for backward).

bf16 = the weights themselves in bf16 (what a CPU user does with `dtype=torch.bfloat16`), same for
both implementations; the loss and the router scores are computed in fp32 by both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch

import nanoseek
from nanoseek import ModelConfig
from nanoseek.machine import banner, matmul_peak

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_config() -> ModelConfig:
    """The issue's model; dims it leaves open are chosen here (printed with the results)."""
    return ModelConfig(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        intermediate_size=1024,  # dense FFN of layer 0 (chosen)
        moe_intermediate_size=256,  # one routed / shared expert (chosen)
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        num_attention_heads=4,  # chosen
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=64,  # chosen
        qk_rope_head_dim=32,  # chosen
        v_head_dim=64,  # chosen
        num_nextn_predict_layers=0,  # transformers has no MTP
        max_position_embeddings=4096,
        rope_scaling=None,
    )


# ----------------------------------------------------------------------------------- FLOPs
def active_matmul_params(c: ModelConfig) -> int:
    """Matmul weights one token multiplies with (the embedding lookup is not a matmul)."""
    D, H = c.hidden_size, c.num_attention_heads
    qk, N, V = c.qk_head_dim, c.qk_nope_head_dim, c.v_head_dim
    if c.q_lora_rank is None:
        q = D * H * qk
    else:
        q = D * c.q_lora_rank + c.q_lora_rank * H * qk
    attn = q + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * H * (N + V) + H * V * D
    total = c.vocab_size * D  # lm_head
    for layer in range(c.num_hidden_layers):
        total += attn
        if c.is_moe_layer(layer):
            experts = c.num_experts_per_tok + (c.n_shared_experts or 0)
            total += c.n_routed_experts * D + experts * 3 * D * c.moe_intermediate_size
        else:
            total += 3 * D * c.intermediate_size
    return total


def flops_per_token(c: ModelConfig, T: int) -> float:
    """6 * active matmul params + causal attention (QK^T and PV), forward + backward."""
    keys = (T + 1) / 2  # a query attends to this many keys on average under the causal mask
    attn_fwd = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * keys
    return 6 * active_matmul_params(c) + 3 * attn_fwd * c.num_hidden_layers


# ----------------------------------------------------------------------------------- models
def load_transformers(directory: str, dtype: torch.dtype):
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = DeepseekV3ForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.train()


def load_nanoseek(directory: str, dtype: torch.dtype, compile: bool):
    model = nanoseek.load(directory, dtype=dtype).train()
    if compile:
        from nanoseek.model import compile_model  # absent from older nanoseek versions

        # one graph per layer kind, no graph breaks (an error, not a silent eager fallback)
        compile_model(model, fullgraph=True, dynamic=False)
    return model


def make_step(model, ids: torch.Tensor, nanoseek_api: bool):
    """One training step: forward with labels, backward, AdamW, zero_grad."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    kwargs = {"mtp": False} if nanoseek_api else {}

    def step() -> float:
        loss = model(ids, labels=ids, **kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def bench_dtype(dtype: torch.dtype, directory: str, ids: torch.Tensor, args) -> dict[str, dict]:
    """Loads every implementation, warms each up, then times them round-robin, one step each
    per round (rotating who goes first): a machine shared with other jobs slows all of them
    alike instead of whichever ran during a busy minute."""
    runs = {} if args.skip_transformers else {"transformers": "hf"}
    runs["nanoseek"] = "ns"
    if args.compile:
        runs["nanoseek+compile"] = "nsc"
    steps, first, compile_s = {}, {}, {}
    for label, kind in runs.items():
        torch.manual_seed(args.seed)
        if kind == "hf":
            model = load_transformers(directory, dtype)
        else:
            model = load_nanoseek(directory, dtype, compile=kind == "nsc")
        steps[label] = make_step(model, ids, nanoseek_api=kind != "hf")
        clock = None
        if kind == "nsc":  # dynamo + inductor + the C++ build, the lazy backward included
            from nanoseek.model.compile import CompileClock

            clock = CompileClock()
        first[label] = timed(steps[label])  # includes compilation for the compiled model
        for _ in range(args.warmup - 1):
            steps[label]()
        if clock is not None:
            compile_s[label] = clock.seconds
            clock.close()
    times = {label: [] for label in runs}
    labels = list(runs)
    for r in range(args.steps):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            times[label].append(timed(steps[label]))
    out = {}
    for label in runs:
        ms = statistics.median(times[label]) * 1e3
        out[label] = dict(ms=ms, first_s=first[label], compile_s=compile_s.get(label, 0.0))
    return out


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--compile", action="store_true", help="also time nanoseek + torch.compile")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true", help="time nanoseek only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--malloc",
        choices=["system", "keep"],
        default="system",
        help="keep: nanoseek.keep_freed_memory() first, for both implementations",
    )
    args = p.parse_args(argv)
    if args.malloc == "keep" and not nanoseek.keep_freed_memory():
        p.error("--malloc keep: not applied (not glibc, or the allocator is configured already)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(banner())  # the machine, its matmul peaks and read bandwidth, measured now

    config = bench_config()
    B, T = args.batch, args.seq
    fpt = flops_per_token(config, T)
    c = config
    print(
        f"model: hidden {c.hidden_size}, {c.num_hidden_layers} layers "
        f"({c.first_k_dense_replace} dense, FFN {c.intermediate_size}), {c.n_routed_experts} "
        f"experts top-{c.num_experts_per_tok} in {c.n_group} groups / top-{c.topk_group}, "
        f"{c.n_shared_experts} shared, expert width {c.moe_intermediate_size}, heads "
        f"{c.num_attention_heads}, qk_nope {c.qk_nope_head_dim}, qk_rope {c.qk_rope_head_dim}, "
        f"v {c.v_head_dim}, q_lora {c.q_lora_rank}, kv_lora {c.kv_lora_rank}, vocab "
        f"{c.vocab_size}, no MTP"
    )
    print(
        f"batch {B} x {T} tokens; {active_matmul_params(c) / 1e6:.2f}M active matmul params, "
        f"{fpt / 1e6:.1f} MFLOP/token; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; AdamW(lr=1e-4, fused=True); malloc {args.malloc}; {args.warmup} warm-up + "
        f"{args.steps} timed steps each, "
        "round-robin, median"
    )
    load0 = os.getloadavg()[0]

    torch.manual_seed(args.seed)
    tmp = tempfile.TemporaryDirectory()
    nanoseek.save(nanoseek.CausalLM(c), tmp.name)
    ids = torch.randint(0, c.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))

    print(
        f"\n{'impl':<17} {'dtype':<5} {'tokens/s':>9} {'ms/step':>8} {'vs HF':>6} {'MFU':>6} "
        f"{'peak GFLOP/s':>12}  note",
        flush=True,
    )
    for name in ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]:
        dtype = DTYPES[name]
        peak = matmul_peak(dtype)
        results = bench_dtype(dtype, tmp.name, ids, args)
        base = results.get("transformers", {}).get("ms")
        for label, r in results.items():
            tps = B * T / (r["ms"] / 1e3)
            note = f"compiled in {r['compile_s']:.1f} s" if label.endswith("compile") else ""
            ratio = f"{base / r['ms']:.2f}x" if base else "-"
            print(
                f"{label:<17} {name:<5} {tps:>9,.0f} {r['ms']:>8.1f} {ratio:>6} "
                f"{tps * fpt / peak:>6.1%} {peak / 1e9:>12.0f}  {note}",
                flush=True,
            )
    tmp.cleanup()
    load1 = os.getloadavg()[0]
    if max(load0, load1) > torch.get_num_threads() + 0.5:
        print(
            f"note: load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs: other "
            "processes shared the machine, absolute numbers are low (ratios less affected)"
        )


if __name__ == "__main__":
    main()
