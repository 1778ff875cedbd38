"""How far the main job's trained MTP modules draft correctly: acceptance by draft depth.

    python experiments/mtp_acceptance.py runs/seeds/seed-0 runs/seeds/seed-1 ...
    python experiments/mtp_acceptance.py runs/speedrun --num-draft 1 2 3 4

For each run directory of `nanoseek speedrun` (or `experiments/speedrun_seeds.py`), the final
model of the R1 pipeline decodes the `speculative` stage's held-out prompts greedily at batch 1
with k = 1, 2, 3 drafts a step, the drafts made with the engine's own weights and with int8
copies (`Engine(draft_quantize=...)`). Printed per run and k: the fraction of steps whose drafts
were accepted up to depth j (j = 1..k; V3 §5.4.3 reports 85-90% for its second token at j = 1),
the tokens a verify step gains, and whether the output equals plain greedy (it must).
bench/mtp_speculative.py turns these rates into a speed-up where decoding is bandwidth-bound.

Each reply is decoded to its end (at most the stage's `spec_new_tokens`), as a user gets it;
`--past-end` decodes `spec_new_tokens` whatever the reply's length (ignore_eos), the tokens past
the end being text neither the model nor its MTP module was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoseek.checkpoint.io import load  # noqa: E402
from nanoseek.data.tokenizer import Tokenizer  # noqa: E402
from nanoseek.eval.evaluate import heldout_problems, resolve  # noqa: E402
from nanoseek.eval.sampling import CHAT, encode_prompt  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.infer.sampling import SamplingParams  # noqa: E402


def run_rates(run: str, ks: list[int], past_end: bool = False) -> list[dict]:
    """Acceptance by depth on one speedrun directory's final model, per k and draft weights."""
    opts = json.load(open(os.path.join(run, "speedrun.json")))["options"]
    done = json.load(open(os.path.join(run, "r1", "DONE")))
    model_dir = done["result"]["final_model"]
    model, tok = load(model_dir, dtype=torch.float32), Tokenizer.load(model_dir)
    problems = heldout_problems(resolve(opts["task"]), opts["spec_prompts"],
                                seed=opts["seed"] + 1, level=opts["level"])  # fmt: skip
    prompts = [encode_prompt(tok, p, CHAT) for p in problems]
    params = SamplingParams(max_new_tokens=opts["spec_new_tokens"], ignore_eos=past_end)
    max_len = max(map(len, prompts)) + opts["spec_new_tokens"] + max(ks) + 1
    plain = Engine(model, tok, max_batch_size=1, max_seq_len=max_len)
    want = [plain.generate([p], params)[0].token_ids for p in prompts]
    rows = []
    for k in ks:
        for draft_quantize in (None, "int8"):
            engine = Engine(model, tok, max_batch_size=1, max_seq_len=max_len, speculative="mtp",
                            num_draft=k, draft_quantize=draft_quantize)  # fmt: skip
            got = [engine.generate([p], params)[0].token_ids for p in prompts]
            s = engine.speculator
            rows.append(dict(run=run, k=k, drafts=draft_quantize or "fp32",
                             reach=s.acceptance_rates(), tokens_per_step=s.tokens_per_step(),
                             tokens=sum(map(len, got)), identical=got == want))  # fmt: skip
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="speedrun output directories")
    p.add_argument("--num-draft", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument(
        "--past-end",
        action="store_true",
        help="decode spec_new_tokens a prompt past the reply's end (ignore_eos)",
    )
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    print(
        "| run | k | draft weights | accepted up to depth 1..k | tokens a step | tokens "
        "| identical |"
    )
    print("|---|---:|---|---|---:|---:|---|")
    for run in args.runs:
        for r in run_rates(run, args.num_draft, args.past_end):
            rows.append(r)
            reach = " / ".join(f"{x:.3f}" for x in r["reach"])
            print(f"| {os.path.basename(run.rstrip('/'))} | {r['k']} | {r['drafts']} | {reach} "
                  f"| {r['tokens_per_step']:.3f} | {r['tokens']} | {r['identical']} |",
                  flush=True)  # fmt: skip
    for k in args.num_draft:
        tps = [r["tokens_per_step"] for r in rows if r["k"] == k]
        print(f"k = {k}: tokens a step {min(tps):.3f}-{max(tps):.3f} over {len(tps)} rows")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
