"""Serving under load: N concurrent streaming chat requests against `nanoseek serve`.

    python bench/serve_load.py                          # random bench-config model, 64 requests
    python bench/serve_load.py --threads 1              # on a busy shared CPU (README numbers)
    python bench/serve_load.py --model runs/tiny/model  # a checkpoint directory (with tokenizer)
    python bench/serve_load.py --url http://127.0.0.1:8000 --model-name NAME [--api-key KEY]

Without --url the script starts `nanoseek serve` as a child process on a free 127.0.0.1 port
(the default model: the model-core benchmark config of bench/train_step.py with random weights
and a small BPE trained on the built-in corpus, saved to a temporary directory). First a few
requests run one at a time (the unbatched baseline), then all `--requests` are sent at once as
streaming chat completions with `stream_options.include_usage` (raw httpx, so every event is
checked: status 200, JSON chunks, usage, a final `data: [DONE]`), the whole run bounded by
`--timeout`. Reported: errors (must be 0; the exit code is 1 otherwise), completion tokens/s,
requests/s, time to first token and total latency percentiles, and the server's /metrics
(largest and mean batch the engine stepped), which shows the requests were batched.
Outputs are fixed-length (`ignore_eos`) so runs are comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from nanoseek.machine import banner  # noqa: E402

WORDS = "the cat sat on a mat two plus three is five what is the sum of seven and nine".split()


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    first: float | None = None  # first event carrying text (reasoning or content)
    end: float = 0.0
    tokens: int = 0
    chunks: int = 0

    @property
    def ttft(self) -> float:
        return (self.first or self.end) - self.start

    @property
    def total(self) -> float:
        return self.end - self.start


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def good(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.good)


# ------------------------------------------------------------------------------ the server
def default_checkpoint(directory: str) -> str:
    """The model-core benchmark config with random weights, plus a small BPE trained on the
    built-in corpus; the model's vocabulary is cut to the tokenizer's so that every sampled id
    decodes to text (random weights sample ids uniformly)."""
    import dataclasses

    import torch

    import nanoseek
    from bench.train_step import bench_config
    from nanoseek.data.corpus import generate_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    tok_dir = os.path.join(directory, "tokenizer")
    tok = train_tokenizer(list(generate_corpus(3000, seed=0)), 2048, tok_dir)
    torch.manual_seed(0)
    model = nanoseek.CausalLM(dataclasses.replace(bench_config(), vocab_size=tok.vocab_size))
    model.init_weights()
    path = os.path.join(directory, "bench-model")
    files = [os.path.join(tok_dir, f) for f in ("tokenizer.json", "tokenizer_config.json")]
    nanoseek.save(model.eval(), path, extra_files=files)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "nanoseek", "serve", model, "--port", str(port)]
    cmd += ["--max-batch", str(args.max_batch), "--log-level", "warning"]
    cmd += ["--max-seq-len", str(args.max_seq_len)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    print(f"starting: {' '.join(cmd[1:])}", file=sys.stderr)
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up in 300 s")
        time.sleep(0.3)


# ------------------------------------------------------------------------------ the client
def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)  # different lengths: prefill batches of ragged prompts
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 40))) for _ in range(n)]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    res = Result(start=time.perf_counter())
    done = False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line:
                    continue
                if not line.startswith("data: "):
                    raise ValueError(f"not an SSE data line: {line[:80]!r}")
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ValueError(f"error event: {chunk['error']}")
                res.chunks += 1
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    d = c["delta"]
                    if res.first is None and (d.get("content") or d.get("reasoning_content")):
                        res.first = time.perf_counter()
        if not done:
            raise ValueError("the stream ended without data: [DONE]")
        if not res.tokens:
            raise ValueError("no usage chunk")
        res.ok = True
    except Exception as e:  # every failure is counted, none stops the run
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.end = time.perf_counter()
    return res


async def run_load(url: str, args, texts: list[str], concurrency: int) -> Run:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    run = Run()

    async def limited(client, text):
        body = {
            "model": args.model_name,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with sem:
            return await one_request(client, url, body)

    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(limited(client, t)) for t in texts]
        done, pending = await asyncio.wait(tasks, timeout=args.timeout)
        for t in pending:  # the run is bounded: what is left counts as errors
            t.cancel()
        run.seconds = time.perf_counter() - t0
        for t in tasks:
            if t in done:
                run.results.append(t.result())
            else:
                run.results.append(Result(error=f"not finished within {args.timeout} s"))
    return run


# ------------------------------------------------------------------------------ report
def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(run: Run) -> dict:
    good = run.good
    ttft = [r.ttft for r in good]
    total = [r.total for r in good]
    per_token = [(r.end - r.first) / (r.tokens - 1) for r in good if r.first and r.tokens > 1]
    return {
        "requests": len(run.results),
        "errors": len(run.results) - len(good),
        "seconds": round(run.seconds, 2),
        "completion_tokens": run.tokens,
        "tokens_per_s": round(run.tokens / max(run.seconds, 1e-9), 1),
        "requests_per_s": round(len(good) / max(run.seconds, 1e-9), 2),
        **{f"ttft_p{p}_s": round(pct(ttft, p), 3) for p in (50, 90, 99)},
        **{f"latency_p{p}_s": round(pct(total, p), 3) for p in (50, 90, 99)},
        "inter_token_p50_ms": round(1000 * pct(per_token, 50), 1),
    }


def mean_batch(before: dict, after: dict) -> float:
    """Mean number of requests advanced per engine step between two /metrics snapshots."""
    h0, h1 = before["batch_size_histogram"], after["batch_size_histogram"]
    steps = {int(k): v - h0.get(k, 0) for k, v in h1.items()}
    n = sum(steps.values())
    return round(sum(k * v for k, v in steps.items()) / n, 2) if n else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--model", help="checkpoint directory to serve (default: random bench model)")
    ap.add_argument("--model-name", help="model id (default: the served model's)")
    ap.add_argument("--api-key", help="bearer token")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    ap.add_argument("--baseline", type=int, default=4, help="requests sent one at a time first")
    ap.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300, help="bound on the whole load run (s)")
    ap.add_argument("--max-batch", type=int, default=32, help="server engine batch (own server)")
    ap.add_argument("--max-seq-len", type=int, default=512, help="server context (own server)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (own server)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    print(banner())  # the machine, its matmul peaks and read bandwidth, measured now

    proc, tmp = None, None
    try:
        url = args.url
        if url is None:
            model = args.model
            if model is None:
                tmp = tempfile.TemporaryDirectory()
                model = default_checkpoint(tmp.name)
            proc, url = start_server(model, args)
        # the API key guards /metrics as well as /v1/*
        auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        if not args.model_name:
            args.model_name = httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"]
        texts = prompts(args.requests + args.baseline, args.seed)
        base = (
            asyncio.run(run_load(url, args, texts[: args.baseline], 1)) if args.baseline else None
        )
        before = httpx.get(url + "/metrics", headers=auth).json()
        load = asyncio.run(run_load(url, args, texts[args.baseline :], args.concurrency))
        after = httpx.get(url + "/metrics", headers=auth).json()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()

    steps = after["engine_steps"] - before["engine_steps"]
    out = {
        "url": url if args.url else "own server on 127.0.0.1",
        "model": args.model_name,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "load": summary(load),
        "baseline_one_at_a_time": summary(base) if base else None,
        "server": {
            "max_batch_size": after["max_batch_size"],
            "max_batch_size_seen": after["max_batch_size_seen"],
            "mean_batch_size": mean_batch(before, after),
            "engine_steps": steps,
            # time inside engine.step() during the run: near 1, the engine is the bottleneck
            "engine_busy_fraction": round(
                (after["engine_busy_s"] - before["engine_busy_s"]) / max(load.seconds, 1e-9), 2
            ),
            "engine_errors": after["engine_errors"],
        },
        "error_samples": sorted({r.error for r in load.results if not r.ok})[:5],
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        s, b, srv = out["load"], out["baseline_one_at_a_time"], out["server"]
        print(
            f"model {out['model']}, {s['requests']} streaming requests, "
            f"{min(args.concurrency, s['requests'])} at once, "
            f"{args.max_tokens} tokens each"
        )
        print(f"  errors               {s['errors']}")
        print(f"  wall time            {s['seconds']:.2f} s")
        print(
            f"  throughput           {s['tokens_per_s']:.1f} tokens/s, {s['requests_per_s']:.2f} requests/s"
        )
        print(
            f"  time to first token  p50 {s['ttft_p50_s']:.3f} s  p90 {s['ttft_p90_s']:.3f} s  p99 {s['ttft_p99_s']:.3f} s"
        )
        print(
            f"  total latency        p50 {s['latency_p50_s']:.3f} s  p90 {s['latency_p90_s']:.3f} s  p99 {s['latency_p99_s']:.3f} s"
        )
        print(f"  inter-token p50      {s['inter_token_p50_ms']:.1f} ms")
        print(
            f"  batching             largest batch stepped {srv['max_batch_size_seen']} "
            f"(engine max {srv['max_batch_size']}), mean {srv['mean_batch_size']} over {srv['engine_steps']} steps, "
            f"engine busy {srv['engine_busy_fraction']:.0%} of the time"
        )
        if b:
            speedup = s["tokens_per_s"] / max(b["tokens_per_s"], 1e-9)
            print(
                f"  one at a time        {b['tokens_per_s']:.1f} tokens/s over {b['requests']} requests "
                f"(batched: {speedup:.1f}x)"
            )
        for e in out["error_samples"]:
            print(f"  error: {e}")
    return 1 if out["load"]["errors"] or (base and out["baseline_one_at_a_time"]["errors"]) else 0  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
