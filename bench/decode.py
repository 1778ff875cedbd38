"""Greedy decoding throughput: nanoseek's engine against transformers `generate`, same weights.

    python bench/decode.py                          # fp32, batch 1 and 8, 256 new tokens
    python bench/decode.py --threads 1 --repeats 5  # pin threads, more repeats on a busy machine
    python bench/decode.py --model runs/tiny/model  # a trained checkpoint: + MTP speculative rows
    python bench/decode.py --threads 1 --gemm-split # + where nanoseek's step time goes
    python bench/decode.py --threads 1 --quantize   # + rows for weight-only int8 decoding

One random model with the model-core benchmark config (`bench/train_step.py: bench_config()`) is
saved with `nanoseek.save`; the SAME directory is loaded by `transformers` and by `nanoseek.load`.
Each run decodes `--new-tokens` tokens greedily after a random prompt of `--prompt-len` tokens,
eos ignored (transformers: `min_new_tokens`), prefill included in the time (as `generate` does).
Runs alternate between the implementations and the table keeps each one's best run (the least
disturbed by other processes on a shared CPU) plus the median, in wall-clock tokens/s and in
tokens per CPU-second of this process (`time.process_time`), which time-slicing by other
processes does not inflate; with --threads 1 it is the cleanest comparison on a busy machine.

KV bytes per token: nanoseek's latent cache (kv_lora_rank + qk_rope_head_dim values per layer,
[V3 §2.1.1]); transformers' measured from the cache object `generate` returns. (transformers 5
caches the compressed latent as well and decompresses all of it through kv_b_proj at every step;
a full per-head K/V cache, printed for reference, is what older versions kept.)

`--gemm-split` profiles one more nanoseek run per batch size (torch.profiler) and splits a step
into GEMM time (mm, bmm, baddbmm, addmm: reading the weights and the cache) and everything else
(norms, RoPE, routing, softmax, indexing, Python), then prints the ceiling: the tokens/s nanoseek
would reach if everything but its GEMMs took no time. The profiler adds ~1 us per operator, so the
"other" share is slightly inflated; the GEMMs (tens of us each) are not.

"nanoseek" is the default engine (where nanoseek's native kernels build, a few rows of an fp32
model go through them: the same maths, sums in other orders); "nanoseek exact" rows keep
PyTorch's operators (`Engine(..., exact=True)`, what the training stack's rollouts use), with the
share of their tokens equal to the default's.

`--quantize` adds "nanoseek int8" rows: the same engine with `quantize="int8"` (weight-only int8
copies of the decode weights, nanoseek/infer/quant.py). Not the same numbers as the fp32
checkpoint: the note gives the share of its tokens equal to nanoseek's fp32 output (on a random
model, whose next-token distributions are nearly flat, greedy paths part early; on a trained
model they stay together, see the README).

Speculative rows (MTP drafting, batch 1) need a model whose MTP module was trained: on random
weights the acceptance rate is meaningless (drafts are noise), so without `--model` they are
only shown with `--speculative`, marked as such.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nanoseek  # noqa: E402
from bench.train_step import bench_config  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402
from nanoseek.machine import banner  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------- runners
def hf_runner(directory: str, dtype: torch.dtype):
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = DeepseekV3ForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # never stop early (like ignore_eos)

    def run(ids: torch.Tensor, n: int):
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                return_dict_in_generate=True,
            )
        return out.sequences[:, ids.shape[1] :], hf_cache_bytes_per_token(out.past_key_values)

    return run


def hf_cache_bytes_per_token(cache) -> float:
    """Bytes per cached token of the key/value tensors [B,H,S,d] in a transformers cache."""
    tensors = [
        t
        for layer in getattr(cache, "layers", [])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    ]
    if not tensors:  # older API: key_cache / value_cache lists
        tensors = list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))
    B, S = tensors[0].shape[0], tensors[0].shape[2]
    return sum(t.numel() * t.element_size() for t in tensors) / (B * S)


def nanoseek_runner(model, batch: int, max_seq_len: int, **engine_kwargs):
    engine = Engine(model, max_batch_size=batch, max_seq_len=max_seq_len, **engine_kwargs)

    def run(ids: torch.Tensor, n: int):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        done = engine.generate(ids.tolist(), params)
        tokens = torch.tensor([c.token_ids for c in done])
        return tokens, engine.runner.cache.bytes_per_token()  # latents of the main layers

    return run, engine


def gemm_split(run, ids: torch.Tensor, n: int) -> tuple[float, float]:
    """(GEMM seconds, all-operator seconds) of one profiled run: self CPU time of the GEMM
    operators against that of every operator."""
    from torch.profiler import profile

    with profile() as prof:
        run(ids, n)
    events = prof.key_averages()
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e6
    return gemm, sum(e.self_cpu_time_total for e in events) / 1e6


GEMM_OPS = ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm")


def time_runs(runners: dict, ids: torch.Tensor, n: int, repeats: int) -> dict:
    """Alternate the runners `repeats` times: wall and CPU seconds per run, outputs, KV bytes."""
    res = {name: {"times": [], "cpu": []} for name in runners}
    for run in runners.values():  # warm-up: allocator, kernels
        run(ids, min(n, 8))
    for _ in range(repeats):
        for name, run in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tokens, cache_bytes = run(ids, n)
            res[name]["times"].append(time.perf_counter() - t0)
            res[name]["cpu"].append(time.process_time() - c0)
            res[name]["tokens"], res[name]["kv"] = tokens, cache_bytes
    return res


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--model", help="a trained checkpoint instead of the random bench model")
    p.add_argument("--prompt", help="prompt text (needs MODEL/tokenizer.json); default: random ids")
    p.add_argument("--speculative", action="store_true", help="MTP rows on a random model too")
    p.add_argument("--num-draft", type=int, default=1, help="drafts per step for MTP rows")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--gemm-split", action="store_true", help="+ GEMM / other split of a step")
    p.add_argument("--quantize", action="store_true", help="+ nanoseek with int8 weights")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(banner())  # the machine, its matmul peaks and read bandwidth, measured now

    tmp = None
    if args.model:
        directory = args.model
    else:
        tmp = tempfile.TemporaryDirectory()
        directory = tmp.name
        torch.manual_seed(args.seed)
        config = bench_config()
        if args.speculative:  # transformers ignores the MTP layer's weights
            config = config.replace(num_nextn_predict_layers=1)
        nanoseek.save(nanoseek.CausalLM(config), directory)
    model = nanoseek.load(directory, dtype=dtype)
    c = model.config
    spec = bool(c.num_nextn_predict_layers) and (args.model is not None or args.speculative)
    prompt = None
    if args.prompt:
        from nanoseek.data.tokenizer import Tokenizer

        prompt = Tokenizer.load(directory).encode(args.prompt, add_bos=True)
        args.prompt_len = len(prompt)
    print(
        f"model: {'random bench_config()' if not args.model else args.model}: hidden "
        f"{c.hidden_size}, {c.num_hidden_layers} layers, {c.n_routed_experts} experts "
        f"top-{c.num_experts_per_tok}, kv_lora {c.kv_lora_rank}, rope {c.qk_rope_head_dim}, "
        f"vocab {c.vocab_size}, MTP modules {c.num_nextn_predict_layers}"
    )
    print(
        f"{args.dtype}, prompt {args.prompt_len} + {args.new_tokens} new tokens (greedy, eos "
        f"ignored), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.repeats} alternating runs each (best and median)"
    )

    gen = torch.Generator().manual_seed(args.seed + 1)
    rows, splits = [], []
    for B in args.batch:
        ids = torch.randint(3, c.vocab_size, (B, args.prompt_len), generator=gen)
        if prompt is not None:
            ids = torch.tensor([prompt] * B)
        max_len = args.prompt_len + args.new_tokens + args.num_draft + 2
        runners = {}
        if not args.skip_transformers:
            runners["transformers"] = hf_runner(directory, dtype)
        runners["nanoseek"], _ = nanoseek_runner(model, B, max_len)
        runners["nanoseek exact"], _ = nanoseek_runner(model, B, max_len, exact=True)
        if args.quantize:
            runners["nanoseek int8"], _ = nanoseek_runner(model, B, max_len, quantize="int8")
        spec_engine = None
        if spec and B == 1:
            runners[f"nanoseek mtp k={args.num_draft}"], spec_engine = nanoseek_runner(
                model, B, max_len, speculative="mtp", num_draft=args.num_draft
            )
        res = time_runs(runners, ids, args.new_tokens, args.repeats)
        base = res.get("transformers")
        if args.gemm_split:
            gemm, total = gemm_split(runners["nanoseek"], ids, args.new_tokens)
            splits.append((B, min(res["nanoseek"]["times"]), gemm, total, base))
        for name, r in res.items():
            best = min(r["times"])
            note = ""
            if base is not None and name != "transformers":
                same = (r["tokens"] == base["tokens"]).float().mean().item()
                note = f"{same:.0%} tokens equal to transformers'"
            if name in ("nanoseek int8", "nanoseek exact"):
                same = (r["tokens"] == res["nanoseek"]["tokens"]).float().mean().item()
                note = f"{same:.0%} tokens equal to nanoseek's default output"
            if name.startswith("nanoseek mtp"):
                rates = spec_engine.speculator.acceptance_rates()
                note = (
                    "acceptance "
                    + ", ".join(f"{x:.0%}" for x in rates)
                    + f"; {spec_engine.speculator.tokens_per_step():.2f} tokens/step"
                    + ("" if args.model else " (random weights: meaningless)")
                )
            cpu = min(r["cpu"])
            rows.append(
                dict(
                    impl=name,
                    batch=B,
                    tps=B * args.new_tokens / best,
                    median=B * args.new_tokens / statistics.median(r["times"]),
                    ratio=(min(base["times"]) / best) if base is not None else float("nan"),
                    cpu_tps=B * args.new_tokens / cpu,
                    cpu_ratio=(min(base["cpu"]) / cpu) if base is not None else float("nan"),
                    kv=r["kv"],
                    note=note,
                )
            )
    print()
    print(
        f"{'impl':<22} {'batch':>5} {'tok/s best':>10} {'median':>8} {'vs HF':>7} "
        f"{'tok/CPU-s':>9} {'vs HF':>7} {'KV B/token':>10}  note"
    )
    for r in rows:
        print(
            f"{r['impl']:<22} {r['batch']:>5} {r['tps']:>10,.0f} {r['median']:>8,.0f} "
            f"{r['ratio']:>6.2f}x {r['cpu_tps']:>9,.0f} {r['cpu_ratio']:>6.2f}x "
            f"{r['kv']:>10,.0f}  {r['note']}"
        )
    full = c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    full *= torch.finfo(dtype).bits // 8
    print(
        f"(a cache of full per-head keys and values would take {full:,} B/token here; "
        "transformers >= 5 caches the MLA latent too and re-expands it every step)"
    )
    for B, best, gemm, total, base in splits:
        n = B * args.new_tokens
        ceiling = f"{n / gemm:,.0f} tokens/s"
        if base is not None:
            ceiling += f" = {min(base['times']) / gemm:.2f}x transformers"
        print(
            f"nanoseek batch {B}: {best / args.new_tokens * 1e3:.2f} ms/step; profiled "
            f"{total / args.new_tokens * 1e3:.2f} ms/step = GEMMs {gemm / args.new_tokens * 1e3:.2f}"
            f" + other {(total - gemm) / args.new_tokens * 1e3:.2f}; ceiling with zero non-GEMM "
            f"time: {ceiling}"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
