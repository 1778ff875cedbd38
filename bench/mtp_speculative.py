"""MTP speculative decoding where decoding is bandwidth-bound: what draft + verify steps cost.

    python bench/mtp_speculative.py                      # 803M MoE + its MTP module, fp32
    python bench/mtp_speculative.py --threads 1 --dense  # + a dense model of the same width
    python bench/mtp_speculative.py --quantize int8      # int8 decode weights (native kernels)
    python bench/mtp_speculative.py --num-draft 1 2 3 --draft-quantize none

At batch 1 a decode step reads every weight it uses once, so speculative decoding pays off when
verifying k+1 tokens costs little more than decoding one. The model is bench/vs_llamacpp.py's
bandwidth-bound MoE (hidden 1024, 8 layers, 64 routed experts top-6 + 2 shared, 803M
parameters) with one MTP module (another MoE block, V3 §2.2), random weights (the embedding
scaled so that tokens decide their routing: EMBED_SCALE), fp32, built in memory. The MTP module
drafts with int8 copies of its weights unless `--draft-quantize none` (the engine's "auto").
Each run decodes `--new-tokens` tokens greedily after the same prompt, for each k drafts a step:

- plain greedy: seconds per token (t_step, the plain run paired with the median never-right run);
- MTP greedy with drafts never right (`Oracle`: another token than plain greedy's, varied as
  a trained module's drafts are; the module's forward still runs): its output must equal plain
  greedy's; the time of its verify forwards (the main model over [t_n, d_1..d_k]) and draft
  forwards (the MTP module) is read by timing the engine's own calls, per step; t_rest is the
  rest of a step;
- the speed-up those times predict for drafts accepted to depth j in a fraction reach[j] of the
  steps: (1 + sum(reach)) * t_step / (t_verify + t_draft(reach) + t_rest). After a accepted
  drafts the MTP forward catches up a + 1 positions (each needs the main model's hidden state;
  only the last one's FFN and head run), timed on its own and scaled to the run's drafts;
- measured end to end: MTP greedy with drafts made right as often as in each acceptance
  profile (`Oracle`: plain greedy's next token in that fraction of the steps, the module's
  forward still run), each run right after a plain greedy run: the speed-up is the pair's
  ratio, the median and range of `--pairs` pairs (a shared host's bandwidth drifts by +-30%
  over minutes; within a pair it mostly holds), prompts' prefill left out.

The never-right run is the reach = 0 point of the prediction, which checks it (the random
module's own drafts would do as well for that, but they are one token over and over). The
acceptance profiles (REACH) are DeepSeek-V3's reported rates, the lowest and highest of the
main job's trained modules over four seeds (`python experiments/mtp_acceptance.py`), and the
ceiling. `--dense` repeats it on a
dense model (every layer an MLP of 4 x 1024, the same attention), where a second token reads no
new weights. Prints the machine, its measured read bandwidth, and the bytes of weights a token
reads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nanoseek  # noqa: E402
from bench.vs_llamacpp import big_config, bytes_per_token  # noqa: E402
from nanoseek.machine import banner, read_bandwidth  # noqa: E402

# A random model's residual stream is dominated by what every position shares: its tokens route
# alike (a verify step's 2 / 3 / 4 tokens choose 7.2 / 8.0 / 8.3 distinct experts of 64 a layer)
# and its greedy output repeats one token. With the embedding 50x its initial scale each token
# decides its own experts: 11.4 / 16.5 / 21.0, the expectation for independent choices
# (64 * (1 - (58/64)^n)), the most a verify step can read, and the output is varied.
EMBED_SCALE = 50.0

# the fraction of steps whose drafts are accepted up to depth j = 1..k, named: DeepSeek-V3's
# reported acceptance of its second token (85-90% [V3 §5.4.3], a module drafting general text),
# the main job's trained modules on their replies, each decoded to its end (the lowest and
# highest of four seeds' final models: `python experiments/mtp_acceptance.py`,
# docs/results.md), and the ceiling
REACH = {
    1: [("V3's reported, low", (0.85,)), ("V3's reported, high", (0.90,)),
        ("main job, lowest seed", (0.981,)), ("main job, highest seed", (0.993,)),
        ("all right", (1.0,))],
    2: [("main job, lowest seed", (0.980, 0.543)), ("main job, highest seed", (0.987, 0.641)),
        ("all right", (1.0, 1.0))],
    3: [("main job, lowest seed", (0.977, 0.563, 0.243)),
        ("main job, highest seed", (0.980, 0.628, 0.383)), ("all right", (1.0, 1.0, 1.0))],
}  # fmt: skip


class Timed:
    """Sums the wall time of an engine's prefill and of its runner's decode and mtp_forward
    calls (those made outside prefill), wrapping the methods on the instances."""

    def __init__(self, engine):
        self.seconds: dict[str, float] = defaultdict(float)
        self._in_prefill = False
        engine._prefill = self._wrap("prefill", engine._prefill)
        for name in ("decode", "mtp_forward"):
            setattr(engine.runner, name, self._wrap(name, getattr(engine.runner, name)))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            if self._in_prefill:
                return fn(*args, **kwargs)
            self._in_prefill = name == "prefill"
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self._in_prefill = False

        return timed


class Oracle:
    """Makes the MTP module's drafts right as often as a trained module's: given the draft
    before it right, the draft at depth j is plain greedy's token in a fraction
    reach[j-1] / reach[j-2] of the steps (reach[-1] read as 1; spread evenly over them, so
    a run's rates are the asked ones), another token otherwise. The module's forward still
    runs (its time is the draft's), only its output is replaced, so the verify steps see the
    real continuation (its routing) and the catch-ups after accepted drafts their positions."""

    def __init__(self, runner, sequence: list[int], reach: tuple[float, ...]):
        self.sequence, self.vocab = sequence, runner.config.vocab_size
        self.cond = [r / prev if prev else 0.0 for prev, r in zip((1.0, *reach), reach)]
        self.tries, self.right = [0] * len(reach), False
        forward = runner.mtp_forward

        def drafted(h_prev, next_ids, row0, start, last_only=False):
            logits, h = forward(h_prev, next_ids, row0, start, last_only)
            if start[0] == 0:  # the prompt's positions (prefill)
                return logits, h
            target = start[0] + next_ids.shape[1] + 1  # the position the last output predicts
            depth = target - runner.cache.lengths[0]  # 1 for d_1 (the pending token is at n)
            if depth == 1 or self.right:  # right in cond of the tries: round(i * cond) of i
                i, c = self.tries[depth - 1], self.cond[depth - 1]
                self.tries[depth - 1] += 1
                self.right = int((i + 1) * c + 0.5) > int(i * c + 0.5)
            token = self.sequence[min(target, len(self.sequence) - 1)]
            logits = torch.zeros_like(logits)
            logits[:, -1, token if self.right else (token + 1) % self.vocab] = 1.0
            return logits, h

        runner.mtp_forward = drafted


def measure(model, prompt: list[int], n: int, quantize: str | None = None, k: int = 1,
            draft_quantize: str | None = None, pairs: int = 3) -> dict:  # fmt: skip
    """Plain greedy decoding of n tokens (batch 1), and MTP greedy with k drafts a step made
    right as never and as often as each of REACH[k], each MTP run right after a plain run: a
    speed-up is a pair's ratio (the median and range of `pairs` pairs), so that the machine's
    drifts in bandwidth (+-30% over minutes on a shared host) fall on both sides of it. Every
    engine is warmed up first; times are less the prompt's prefill."""
    seq = len(prompt) + n + k + 1
    plain = nanoseek.Engine(model, max_batch_size=1, max_seq_len=seq, quantize=quantize)
    nanoseek.generate(model, [prompt], max_new_tokens=8, engine=plain)
    tp = Timed(plain)

    def plain_seconds() -> tuple[float, torch.Tensor]:
        before = tp.seconds["prefill"]
        t0 = time.perf_counter()
        out = nanoseek.generate(model, [prompt], max_new_tokens=n, engine=plain)
        return time.perf_counter() - t0 - (tp.seconds["prefill"] - before), out

    ref = plain_seconds()[1]
    sequence = prompt + ref[0].tolist()

    def mtp_pairs(reach: tuple[float, ...]):
        spec = nanoseek.Engine(model, max_batch_size=1, max_seq_len=seq, speculative="mtp",
                               num_draft=k, quantize=quantize, draft_quantize=draft_quantize)  # fmt: skip
        Oracle(spec.runner, sequence, reach)
        nanoseek.generate(model, [prompt], max_new_tokens=8, engine=spec)
        ts, s = Timed(spec), spec.speculator
        runs = []
        for _ in range(pairs):
            t_plain = plain_seconds()[0]
            s.reset_stats()
            before = dict(ts.seconds)
            t0 = time.perf_counter()
            out = nanoseek.generate(model, [prompt], max_new_tokens=n, engine=spec)
            spent = {key: ts.seconds[key] - before.get(key, 0.0) for key in list(ts.seconds)}
            t = time.perf_counter() - t0 - spent.get("prefill", 0.0)
            runs.append(dict(reach=reach, realized=s.acceptance_rates(), seconds=t,
                             t_plain=t_plain, speedup=t_plain / t, spent=spent,
                             tokens_per_step=s.tokens_per_step(), steps=s.row_steps,
                             identical=bool(torch.equal(ref, out))))  # fmt: skip
        return spec, runs

    # drafts never right (each another token than plain greedy's: varied, as a trained
    # module's are): each step runs k one-position MTP forwards (the catch-up and k - 1 further
    # drafts) and verifies k + 1 tokens. After a accepted drafts the catch-up covers a + 1
    # positions: its time scaled from the run's by the ratio of the two timed on their own
    # (alone, back to back, both run faster than inside the decode loop). The times of the
    # pair with the median speed-up make the prediction's.
    spec, never = mtp_pairs((0.0,) * k)
    mid = sorted(never, key=lambda run: run["speedup"])[len(never) // 2]
    steps = mid["steps"]
    t_verify, t_draft = mid["spent"]["decode"] / steps, mid["spent"]["mtp_forward"] / steps
    alone = [mtp_seconds(spec, model, T, len(prompt)) for T in range(1, k + 2)]
    one = t_draft / k
    del spec
    return dict(
        k=k,
        t_step=mid["t_plain"] / (n - 1),  # prefill makes the first token
        t_verify=t_verify, t_draft=t_draft, t_rest=mid["seconds"] / steps - t_verify - t_draft,
        t_draft_after=[one * (t / alone[0] + k - 1) for t in alone],  # [a]: after a accepted
        never=never, oracle=[(name, mtp_pairs(reach)[1]) for name, reach in REACH[k]],
    )  # fmt: skip


@torch.inference_mode()
def mtp_seconds(engine, model, T: int, start: int, reps: int = 8) -> float:
    """Best time of the engine's MTP forward over T positions from `start` (its cache rolled
    back after each). A step after a accepted drafts runs it over a + 1 positions: the accepted
    tokens' and the next (each needs the main model's hidden state from the verify forward),
    so accepted drafts cost more than a rejected one's single position; as the
    speculator does, only the last position's output is computed (the others write their cache
    entries; their FFN and head are skipped)."""
    runner, dev = engine.runner, model.device
    h = torch.randn(1, T, model.config.hidden_size, dtype=model.dtype, device=dev)
    ids = torch.arange(5, 5 + T, device=dev)[None]
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.mtp_forward(h, ids, 0, [start], last_only=T > 1)
        best = min(best, time.perf_counter() - t0)
        runner.mtp_cache.rollback(0, start)
    return best


def predicted(r: dict, reach: tuple[float, ...]) -> float:
    """Speed-up for drafts reaching depth j with probability reach[j-1] (reach[0] the first
    draft's acceptance, 1 >= reach[0] >= reach[1] ...): 1 + sum(reach) tokens per step, and
    the step's MTP forward catches up a + 1 positions after a accepted drafts."""
    p_at_least = (1.0, *reach, 0.0)
    draft = sum((p_at_least[a] - p_at_least[a + 1]) * r["t_draft_after"][a]
                for a in range(r["k"] + 1))  # fmt: skip
    return (1 + sum(reach)) * r["t_step"] / (r["t_verify"] + draft + r["t_rest"])


def spread(runs: list[dict]) -> str:
    """The pairs' speed-ups: median (lowest-highest)."""
    x = sorted(run["speedup"] for run in runs)
    return f"{x[len(x) // 2]:.2f}x plain ({x[0]:.2f}-{x[-1]:.2f} over {len(x)} pairs)"


def report(label: str, cfg, r: dict, bandwidth: float, bytes_per_weight: float) -> None:
    k, ms = r["k"], {key: r[key] * 1e3 for key in ("t_step", "t_verify", "t_draft", "t_rest")}
    if label:
        nbytes = bytes_per_token(cfg) * bytes_per_weight
        print(f"\n{label}: {nbytes / 1e9:.2f} GB of weights per token, {1 / r['t_step']:.1f} "
              f"tokens/s plain ({nbytes / r['t_step'] / bandwidth:.0%} of the roofline), "
              f"{ms['t_step']:.1f} ms a step")  # fmt: skip
    after = ", ".join(f"{t * 1e3:.1f}" for t in r["t_draft_after"][1:])
    print(f"  {k} draft(s) a step: verify {k + 1} tokens {ms['t_verify']:.1f} ms "
          f"({ms['t_verify'] / ms['t_step']:.2f}x a decode step) + drafts {ms['t_draft']:.1f} "
          f"(after 1.. accepted: {after}) + other {ms['t_rest']:.1f}")  # fmt: skip
    never = r["never"]
    print(f"    drafts never right: {never[0]['tokens_per_step']:.2f} tokens a step, measured "
          f"{spread(never)}, predicted {predicted(r, never[0]['reach']):.2f}x; output identical: "
          f"{all(run['identical'] for run in never)}")  # fmt: skip
    print("    drafts right as often as:")
    for name, runs in r["oracle"]:
        run = runs[0]
        realized = "/".join(f"{x:.2f}" for x in run["realized"])
        print(f"      {name}: accepted to depth 1..{k} "
              f"{'/'.join(f'{x:.2f}' for x in run['reach'])} (this run {realized}, "
              f"{run['tokens_per_step']:.2f} tokens a step): measured {spread(runs)}, predicted "
              f"{predicted(r, tuple(run['realized'])):.2f}x; output identical: "
              f"{all(x['identical'] for x in runs)}")  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--pairs", type=int, default=3, help="plain + MTP runs per acceptance profile")
    p.add_argument("--dense", action="store_true", help="also a dense model of the same width")
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 decode weights")
    p.add_argument("--num-draft", type=int, nargs="+", default=[1, 2], choices=sorted(REACH),
                   help="drafts per step, each measured")  # fmt: skip
    p.add_argument(
        "--draft-quantize",
        choices=["int8", "none"],
        default="int8",
        help="the MTP module's weights for drafting (Engine(draft_quantize=...))",
    )
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    nanoseek.keep_freed_memory()
    print(banner(), flush=True)
    bandwidth = read_bandwidth()
    draft_q = None if args.draft_quantize == "none" else args.draft_quantize
    print(f"read bandwidth at {torch.get_num_threads()} threads: {bandwidth / 1e9:.1f} GB/s; "
          f"batch 1, greedy, {args.new_tokens} new tokens, "
          f"{'int8 weights' if args.quantize else 'fp32'}, drafts with "
          f"{draft_q or args.quantize or 'fp32'} weights", flush=True)  # fmt: skip
    prompt = list(range(5, 37))
    configs = {"MoE (803M, 64 experts top-6)": big_config().replace(num_nextn_predict_layers=1)}
    if args.dense:
        configs["dense (same attention, MLP 4096)"] = configs[next(iter(configs))].replace(
            first_k_dense_replace=8
        )
    with torch.no_grad():
        for label, cfg in configs.items():
            torch.manual_seed(0)
            model = nanoseek.CausalLM(cfg).eval()
            model.model.embed_tokens.weight.mul_(EMBED_SCALE)  # tokens decide their routing
            for i, k in enumerate(args.num_draft):
                r = measure(model, prompt, args.new_tokens, args.quantize, k, draft_q, args.pairs)
                report(label if i == 0 else "", cfg, r, bandwidth, 1 if args.quantize else 4)
            del model


if __name__ == "__main__":
    main()
