"""Greedy decoding, nanoseek against llama.cpp on the same checkpoint, as % of the memory roofline.

    python bench/vs_llamacpp.py --build           # first run: builds llama-cpp-python (~8 min)
    python bench/vs_llamacpp.py                   # both models, fp32 / bf16 / 8-bit, 1 and 2 threads
    python bench/vs_llamacpp.py --models big --precisions bf16 --threads 2 --repeats 3

llama.cpp runs through `llama-cpp-python` from its own virtual environment (bench/llamacpp_setup.py:
an optional bench dependency, built from the sdist with gcc + cmake for this CPU; nothing is
installed into the project's venv). Each checkpoint is converted by llama.cpp's own
`convert_hf_to_gguf.py` (from that sdist's vendor/llama.cpp) to f32, bf16 and q8_0 GGUF files;
the converter drops MTP layers, as it does for DeepSeek-V3. nanoseek's tokenizer (byte-level BPE,
digits split one by one) is registered as llama.cpp's "smollm" pre-tokenizer, the one that
splits the same way (a run-time patch of the converter's table, see llamacpp_setup.py).

Models (built once into --cache, default ~/.cache/nanoseek/vs_llamacpp, and reused):
  speedrun  the `tiny` preset with the speedrun's 1024-id tokenizer, pre-trained for
            --speedrun-steps steps on the built-in corpus (`nanoseek pretrain`'s code): a trained
            model, whose greedy paths are stable; --model DIR uses a checkpoint of yours instead
  big       V3 architecture, hidden 1024, 8 layers (1 dense), 64 routed experts top-6 + 2 shared,
            MLA with q_lora 512, kv_lora 512, 16 heads: 803M parameters, 165M active per token;
            random weights saved in bf16 (1.6 GB), the bandwidth-bound case

Precisions: fp32 (nanoseek `dtype=torch.float32`, GGUF f32 with an f32 KV cache: llama.cpp's
default f16 cache would make the two differ by more than the order of additions), bf16 (nanoseek's weights in bf16,
GGUF bf16) and 8-bit (nanoseek `quantize="int8"` on the fp32 model: weight-only int8 with one
scale per output channel; GGUF q8_0: int8 blocks of 32 with an fp16 scale, 34 bytes per 32 weights).

Each run decodes --new-tokens tokens greedily at batch 1 after the same prompt (token ids from
nanoseek's tokenizer, given to both as ids; eos ignored), prompt processing included in the time.
Runs alternate between the two implementations; the table keeps each one's best (the run least
disturbed by other processes on a shared machine) and shows the median. llama.cpp decodes in a
worker process through its C API (llama_decode per token, its greedy sampler); nanoseek through
`nanoseek.generate` with a reused `Engine`. Threads: llama.cpp n_threads, torch.set_num_threads.

Roofline: a decode step at batch 1 reads every weight a token uses once, so tokens/s <= read
bandwidth / bytes of weights per token. Bytes per token = active parameters (only the top-k
routed experts a token uses, the embedding as the one row it reads; nanoseek's accounting,
nanoseek/checkpoint/accounting.py) x bytes per weight (4, 2, 34/32 for q8_0). The bandwidth is
`nanoseek.machine.read_bandwidth` measured in this run at each thread count. The GGUF files' own
bytes per token (every tensor, experts at top_k / n_experts) are printed next to it.

Greedy agreement: the share of the generated positions where two outputs hold the same token,
and the first position where they differ; nanoseek against llama.cpp in the same precision, and
each against llama.cpp f32 (the reference).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nanoseek  # noqa: E402
from bench import llamacpp_setup as ll  # noqa: E402
from nanoseek import ModelConfig  # noqa: E402
from nanoseek.checkpoint.accounting import account  # noqa: E402
from nanoseek.machine import banner, read_bandwidth  # noqa: E402

PRECISIONS = {  # ours: (load dtype, quantize); llama.cpp: GGUF outtype; bytes per weight
    "fp32": (torch.float32, None, "f32", 4.0),
    "bf16": (torch.bfloat16, None, "bf16", 2.0),
    "8-bit": (torch.float32, "int8", "q8_0", 34 / 32),
}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "nanoseek", "vs_llamacpp")
DEFAULT_PROMPT = "What is 27 + 58? Let me add the ones first:"


def big_config() -> ModelConfig:
    """The bandwidth-bound model: ~1.6 GB in bf16, 803M parameters, 165M active per token."""
    return ModelConfig(
        vocab_size=4096,
        hidden_size=1024,
        num_hidden_layers=8,
        first_k_dense_replace=1,
        intermediate_size=4096,
        moe_intermediate_size=512,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        n_group=8,
        topk_group=4,
        num_attention_heads=16,
        q_lora_rank=512,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        num_nextn_predict_layers=0,  # llama.cpp's converter would drop it
        max_position_embeddings=4096,
        rope_scaling=None,
        torch_dtype="bfloat16",
    )


# ----------------------------------------------------------------------------------- models
def speedrun_model(cache: str, steps: int) -> str:
    """The speedrun's model (tiny preset, 1024-id tokenizer) after `steps` pre-training steps."""
    out = os.path.join(cache, f"speedrun-{steps}")
    model = os.path.join(out, "model")
    if os.path.isfile(os.path.join(model, "config.json")):
        return model
    from nanoseek.train.pretrain import PretrainOptions, run_pretrain

    print(f"pre-training the speedrun model for {steps} steps into {out} (once)", flush=True)
    opts = PretrainOptions(
        out=out, model="tiny", vocab_size=1024, seq_len=128, batch_size=16, lr=3e-3,
        max_steps=steps, warmup_steps=min(20, max(1, steps // 10)), lr_schedule="wsd",
        eval_every=steps, save_every=steps, keep_last=1, plot=False, overwrite=True,
    )  # fmt: skip
    run_pretrain(opts, progress=False)
    return model


def big_model(cache: str, tokenizer_source: Callable[[], str]) -> str:
    """Random weights of big_config(), saved once in bf16 with the tokenizer files of the
    directory `tokenizer_source()` returns, called only when the model is written (ids past the
    tokenizer's are padding tokens for llama.cpp; the bench compares ids)."""
    out = os.path.join(cache, "big-803M")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    print(f"writing the random 803M model to {out} (once)", flush=True)
    torch.manual_seed(0)
    model = nanoseek.CausalLM(big_config())
    tokenizer_dir = tokenizer_source()
    extra = [os.path.join(tokenizer_dir, f) for f in ("tokenizer.json", "tokenizer_config.json")]
    nanoseek.save(model, out, dtype=torch.bfloat16, extra_files=extra)
    return out


def bytes_per_token(config: ModelConfig) -> int:
    """Weights one decode step reads, in parameters: the active ones with the embedding as one row."""
    a = account(config)
    return a.active_params - a.embedding_params + config.hidden_size


# ----------------------------------------------------------------------------------- runners
class NanoseekRunner:
    def __init__(self, directory: str, precision: str, max_seq_len: int):
        dtype, quantize, _, _ = PRECISIONS[precision]
        self.model = nanoseek.load(directory, dtype=dtype)
        self.engine = nanoseek.Engine(
            self.model, max_batch_size=1, max_seq_len=max_seq_len, quantize=quantize
        )

    def __call__(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        out = nanoseek.generate(self.model, [prompt], max_new_tokens=n, engine=self.engine)
        return out[0].tolist(), time.perf_counter() - t0


class LlamaRunner:
    def __init__(self, worker, gguf: str, max_seq_len: int, threads: int, extra: bool, f32: bool):
        self.worker = worker
        self.info = worker.call(op="load", path=gguf, n_ctx=max_seq_len, threads=threads,
                                extra_bufts=extra, f32_cache=f32)  # fmt: skip

    def threads(self, n: int) -> None:
        self.worker.call(op="threads", threads=n)

    def __call__(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        r = self.worker.call(op="generate", prompt=prompt, n=n)
        return r["tokens"], r["seconds"]


def agreement(a: list[int], b: list[int]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return f"{same}/{len(a)}" + ("" if first is None else f" (first differs at {first})")


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=["speedrun", "big"], default=["speedrun", "big"])
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per implementation")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--cache", default=DEFAULT_CACHE, help="models and GGUF files, reused")
    p.add_argument("--model", help="a checkpoint of yours in place of the speedrun model")
    p.add_argument("--speedrun-steps", type=int, default=100)
    p.add_argument("--llama-venv", default=ll.DEFAULT_VENV)
    p.add_argument("--build", action="store_true", help="build llama-cpp-python if missing")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument(
        "--llama-extra-bufts",
        action="store_true",
        help="let llama.cpp repack weights into its extra (AMX / AVX) buffer types; off by "
        "default: llama-cpp-python 0.3.36 aborts on q8_0 DeepSeek models with them here",
    )
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    machine = banner()  # the machine, its matmul peaks and read bandwidth, measured now
    print(machine, flush=True)

    found = ll.find(args.llama_venv)
    if found is None:
        if not args.build:
            sys.exit(
                f"llama-cpp-python is not in {args.llama_venv}: rerun with --build (builds it "
                "there from the sdist, ~8 min) or `python bench/llamacpp_setup.py build`"
            )
        found = ll.build(args.llama_venv)
    llama_python, tree = found
    os.makedirs(args.cache, exist_ok=True)
    log = os.path.join(args.cache, "llama.log")

    bandwidth = {}
    for t in args.threads:
        torch.set_num_threads(t)
        bandwidth[t] = read_bandwidth()
    print("read bandwidth: " + ", ".join(f"{bw / 1e9:.1f} GB/s at {t} thread{'s' * (t > 1)}"
                                         for t, bw in bandwidth.items()))  # fmt: skip
    worker = ll.Worker(llama_python, log)
    print(f"llama-cpp-python {worker.info['version']} ({llama_python}); "
          f"llama.cpp system info: {worker.info['system']}")  # fmt: skip

    from nanoseek.data.tokenizer import Tokenizer

    dirs = {}
    speedrun = lambda: args.model or speedrun_model(args.cache, args.speedrun_steps)
    if "speedrun" in args.models:
        dirs["speedrun"] = speedrun()
    if "big" in args.models:  # with the speedrun's tokenizer files
        dirs["big"] = big_model(args.cache, speedrun)
    rows = []
    for name in args.models:
        directory = dirs[name]
        config = ModelConfig.from_pretrained(directory)
        tok = Tokenizer.load(directory)
        prompt = tok.encode(args.prompt, add_bos=True)
        max_len = len(prompt) + args.new_tokens + 8
        a = account(config)
        params = bytes_per_token(config)
        tag = f"{name}-{hashlib.sha1(os.path.abspath(directory).encode()).hexdigest()[:8]}"
        print(f"\nmodel {name} ({directory}): hidden {config.hidden_size}, "
              f"{config.num_hidden_layers} layers, {config.n_routed_experts} experts "
              f"top-{config.num_experts_per_tok} + {config.n_shared_experts} shared, vocab "
              f"{config.vocab_size}: {a.total_params / 1e6:,.1f}M parameters, "
              f"{a.active_params / 1e6:,.1f}M active; weights read per token: "
              f"{params / 1e6:,.2f}M")  # fmt: skip
        print(f"prompt: {args.prompt!r} = {len(prompt)} tokens, then {args.new_tokens} "
              "greedy tokens (eos ignored)")  # fmt: skip
        reference = None  # llama.cpp f32's tokens
        outputs = {}
        for precision in args.precisions:
            outtype, per_weight = PRECISIONS[precision][2], PRECISIONS[precision][3]
            gguf = os.path.join(args.cache, f"{tag}-{outtype}.gguf")
            if not os.path.exists(gguf):
                print(f"converting with convert_hf_to_gguf.py --outtype {outtype}", flush=True)
            ll.convert(directory, gguf, outtype, tree, log)
            tensors = ll.gguf_tensors(gguf, tree)
            gguf_bytes = ll.gguf_bytes_per_token(
                tensors, config.n_routed_experts, config.num_experts_per_tok, config.vocab_size
            )
            llama = LlamaRunner(worker, gguf, max_len, args.threads[0], args.llama_extra_bufts,
                                precision == "fp32")  # fmt: skip
            if precision == args.precisions[0]:
                text = worker.call(op="tokenize", text=args.prompt)["tokens"]
                print("llama.cpp tokenizes the prompt "
                      + ("identically" if text == prompt else f"differently: {text} vs {prompt}"))  # fmt: skip
            ours = NanoseekRunner(directory, precision, max_len)
            roof_bytes = params * per_weight
            for t in args.threads:
                torch.set_num_threads(t)
                llama.threads(t)
                runners = {"llama.cpp": llama, "nanoseek": ours}
                times = {k: [] for k in runners}
                for run in runners.values():  # warm-up
                    run(prompt, 8)
                for _ in range(args.repeats):
                    for k, run in runners.items():
                        tokens, seconds = run(prompt, args.new_tokens)
                        times[k].append(seconds)
                        outputs[(k, precision)] = tokens
                roof = bandwidth[t] / roof_bytes
                row = dict(model=name, precision=precision, threads=t, bytes_per_token=roof_bytes,
                           gguf_bytes_per_token=gguf_bytes, bandwidth=bandwidth[t],
                           roofline_tps=roof)  # fmt: skip
                for k, ts in times.items():
                    row[k] = args.new_tokens / min(ts)
                    row[k + " median"] = args.new_tokens / statistics.median(ts)
                    row[k + " %roof"] = 100 * row[k] / roof
                rows.append(row)
                print(f"  {precision:>5} {t} thr: llama.cpp {row['llama.cpp']:8,.1f} tok/s "
                      f"({row['llama.cpp %roof']:3.0f}%), nanoseek {row['nanoseek']:8,.1f} tok/s "
                      f"({row['nanoseek %roof']:3.0f}%) of roofline {roof:,.1f}", flush=True)  # fmt: skip
            if precision == "fp32":
                reference = outputs[("llama.cpp", "fp32")]
            agree = agreement(outputs[("nanoseek", precision)], outputs[("llama.cpp", precision)])
            for row in rows[-len(args.threads) :]:
                row["agreement"] = agree
                if reference is not None:
                    row["nanoseek vs llama f32"] = agreement(outputs[("nanoseek", precision)],
                                                             reference)  # fmt: skip
                    row["llama vs llama f32"] = agreement(outputs[("llama.cpp", precision)],
                                                          reference)  # fmt: skip
            del ours
        print_table([r for r in rows if r["model"] == name], name)
    worker.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                       "rows": rows}, f, indent=1)  # fmt: skip


def print_table(rows: list[dict], name: str) -> None:
    print(f"\n{name}: tokens/s at batch 1 (best of the runs; median in brackets), % of the "
          "roofline = bandwidth / bytes per token")  # fmt: skip
    print(f"{'precision':<9} {'thr':>3} {'MB/token':>8} {'GGUF MB':>8} {'GB/s':>5} "
          f"{'roofline':>8} {'llama.cpp':>17} {'%':>4} {'nanoseek':>17} {'%':>4} {'ns/ll':>6}  "
          "greedy agreement (nanoseek-llama.cpp same precision | vs llama.cpp f32: nanoseek, "
          "llama.cpp)")  # fmt: skip
    for r in rows:
        ll_s = f"{r['llama.cpp']:,.1f} ({r['llama.cpp median']:,.0f})"
        ns_s = f"{r['nanoseek']:,.1f} ({r['nanoseek median']:,.0f})"
        print(f"{r['precision']:<9} {r['threads']:>3} {r['bytes_per_token'] / 1e6:>8.2f} "
              f"{r['gguf_bytes_per_token'] / 1e6:>8.2f} {r['bandwidth'] / 1e9:>5.1f} "
              f"{r['roofline_tps']:>8,.1f} {ll_s:>17} {r['llama.cpp %roof']:>3.0f}% "
              f"{ns_s:>17} {r['nanoseek %roof']:>3.0f}% {r['nanoseek'] / r['llama.cpp']:>5.2f}x  "
              f"{r.get('agreement', '')} | {r.get('nanoseek vs llama f32', '-')}, "
              f"{r.get('llama vs llama f32', '-')}")  # fmt: skip


if __name__ == "__main__":
    main()
