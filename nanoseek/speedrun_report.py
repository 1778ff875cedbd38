"""The speedrun's report card: OUT/report.md, its plots under OUT/plots/, OUT/report.json.

Written from the stages' DONE files only (speedrun.py), so it can be rewritten at any time - after
every stage, or by a re-run that skipped them all - and always shows exactly what finished.
"""

from __future__ import annotations

import dataclasses
import json
import os

from nanoseek.speedrun import SpeedrunOptions
from nanoseek.train.pipeline import duration, read_done, write_json


def write_report(opts: SpeedrunOptions, eff: SpeedrunOptions, stages: list[str],
                 machine: dict) -> dict:  # fmt: skip
    """Write OUT/report.md (+ plots, report.json) from the finished stages; returns the data."""
    out = opts.out
    done = {s: read_done(os.path.join(out, s)) for s in stages}
    done = {s: d for s, d in done.items() if d is not None}
    res = {s: d["result"] for s, d in done.items()}
    plots = _plots(out, res)
    total = sum(d["wall_s"] for d in done.values())
    md = [
        "# nanoseek speedrun: report card",
        "",
        f"`nanoseek speedrun --out {out}" + (" --smoke" if opts.smoke else "")
        + (" --fp8" if opts.fp8 else "") + f"` - preset `{opts.preset}`, task `{opts.task}` "
        f"(level {opts.level}), seed {opts.seed}"
        + (" - **smoke mode: a handful of steps per stage, numbers mean nothing**"
           if opts.smoke else ""),
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch "
        f"threads, torch {machine['torch']}, Python {machine['python']}"
        + (f", GPU {machine['cuda']}" if machine.get("cuda") else "") + ".",
        f"Stages finished: {len(done)} of {len(stages)}; wall time of the stages: "
        f"{duration(total)}.",
        "",
        "| stage | wall time | result |",
        "|---|---:|---|",
    ]  # fmt: skip
    for s in stages:
        if s in done:
            resumed = " (resumed)" if done[s].get("resumed") else ""
            md.append(f"| {s} | {duration(done[s]['wall_s'])}{resumed} | {_headline(s, res[s])} |")
        else:
            md.append(f"| {s} | - | not run yet |")
    md += _sections(out, res, plots)
    md += _hyperparameters(out, eff, res, stages)
    final = res.get("r1", {}).get("final_model")
    md += ["", "## Use the result", ""]
    if final:
        md += [
            "```bash",
            f"nanoseek chat {final}",
            f"nanoseek serve {final} --port 8000",
            "```",
        ]
    else:
        md.append("The R1 stage has not finished yet: re-run the same command to continue.")
    text = "\n".join(md) + "\n"
    tmp = os.path.join(out, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, "report.md"))
    card = {"options": dataclasses.asdict(opts), "machine": machine, "stages": done,
            "total_wall_s": total, "plots": plots}  # fmt: skip
    write_json(os.path.join(out, "report.json"), card)
    return card


def _headline(stage: str, r: dict) -> str:
    if stage == "tokenizer":
        return f"{r['documents']:,} documents, vocabulary {r['vocab_size']:,}"
    if stage == "pretrain":
        val = r["val_loss"]
        v = f"val loss {val[0][1]:.3f} -> {val[-1][1]:.3f}, " if val else ""
        return (f"{r['steps']} steps ({r['precision']}), {v}MaxVio {r['maxvio_global_end']:.3f}, "
                f"{r['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    if stage == "fp8_vs_bf16":
        return f"relative loss gap {r['rel_diff']:.3%} after {r['steps']} steps"
    if stage == "r1":
        rows = r["summary"]["stages"]
        return f"held-out pass@1 {rows[0]['pass@1']:.1%} (base) -> {rows[-1]['pass@1']:.1%} (final)"
    if stage == "distill":
        before = f" (from {r['init_eval']['accuracy']:.1%})" if r.get("init_eval") else ""
        return (f"student ({r['student_params'] / 1e6:.2f}M params) pass@1 "
                f"{r['eval']['accuracy']:.1%}{before}")  # fmt: skip
    if stage == "speculative":
        return (f"MTP {r['speedup']:.2f}x plain greedy, acceptance "
                f"{', '.join(f'{a:.0%}' for a in r['acceptance'])}, identical output: "
                f"{'yes' if r['greedy_identical'] else 'NO'}")  # fmt: skip
    return ""


def _plots(out: str, res: dict) -> dict[str, str]:
    """Plots of the report (paths relative to OUT); the trainers wrote most of them already."""
    from nanoseek.analysis.plots import plot_bars

    plots = {}
    for name, rel in (("pretrain_loss", "pretrain/loss.png"),
                      ("expert_load", "pretrain/expert_load.png"),
                      ("fp8_vs_bf16", "fp8_vs_bf16/fp8_vs_bf16.png"),
                      ("reward_reasoning_rl", "r1/reasoning_rl/reward.png"),
                      ("reward_final_rl", "r1/final_rl/reward.png"),
                      ("distill_loss", "distill/loss.png")):  # fmt: skip
        if os.path.isfile(os.path.join(out, rel)):
            plots[name] = rel
    if "r1" in res:
        acc = {row["stage"]: row["pass@1"] for row in res["r1"]["summary"]["stages"]}
        if "distill" in res:
            acc["student (distilled)"] = res["distill"]["eval"]["accuracy"]
        plot_bars(acc, os.path.join(out, "plots", "accuracy.png"),
                  "held-out pass@1 per stage", "pass@1")  # fmt: skip
        plots["accuracy"] = "plots/accuracy.png"
    if "speculative" in res:
        r = res["speculative"]
        plot_bars({"plain greedy": r["plain_tokens_per_s"], "MTP speculative": r["mtp_tokens_per_s"]},
                  os.path.join(out, "plots", "decode_speed.png"),
                  f"decode speed, batch 1 (MTP acceptance {r['acceptance'][0]:.0%})",
                  "tokens/s", fmt="{:.0f}")  # fmt: skip
        plots["decode_speed"] = "plots/decode_speed.png"
    return plots


def _img(plots: dict, name: str, alt: str) -> list[str]:
    return [f"![{alt}]({plots[name]})", ""] if name in plots else []


def _sections(out: str, res: dict, plots: dict) -> list[str]:
    md: list[str] = []
    if "pretrain" in res:
        r = res["pretrain"]
        md += ["", "## Pre-training", ""]
        md.append(f"{r['steps']} steps of {r['options']['batch_size']} x "
                  f"{r['options']['seq_len']} tokens in {r['precision']}, "
                  f"auxiliary-loss-free balancing + MTP; median {r['tokens_per_s']:,.0f} tokens/s.")  # fmt: skip
        if r["val_loss"]:
            pts = ", ".join(f"{s}: {v:.3f}" for s, v in r["val_loss"])
            md.append(f"Validation loss by step: {pts}. Final training loss "
                      f"{r['train_loss_end']:.3f}, MaxVio (global) {r['maxvio_global_end']:.3f}.")  # fmt: skip
        md.append("")
        md += _img(plots, "pretrain_loss", "pre-training loss")
        md += _img(plots, "expert_load", "expert load per layer")
    if "fp8_vs_bf16" in res:
        r = res["fp8_vs_bf16"]
        md += ["", "## FP8 vs BF16", ""]
        md.append(f"Same data, seed and schedule, {r['steps']} steps each: smoothed final loss "
                  f"BF16 {r['final_loss']['bf16']:.4f}, FP8 {r['final_loss']['fp8']:.4f}, "
                  f"relative gap {r['rel_diff']:.3%} (DeepSeek-V3: < 0.25%). Speed "
                  f"{r['tokens_per_s']['bf16']:,.0f} vs {r['tokens_per_s']['fp8']:,.0f} tokens/s "
                  "(FP8 is emulated on a CPU: numerics, not speed).")  # fmt: skip
        md.append("")
        md += _img(plots, "fp8_vs_bf16", "FP8 vs BF16 loss")
    if "r1" in res:
        from nanoseek.train.pipeline import format_table

        md += ["", "## R1 pipeline (held-out accuracy of every stage)", ""]
        md.append(format_table(res["r1"]["summary"]))
        md.append("")
        md += _img(plots, "accuracy", "held-out accuracy per stage")
        md += _img(plots, "reward_reasoning_rl", "reasoning RL reward")
        md += _img(plots, "reward_final_rl", "final RL reward")
    if "distill" in res:
        r = res["distill"]
        md += ["", "## Distillation", ""]
        tv = r["teacher_val_loss"]
        ie = r.get("init_eval")
        md.append(
            f"Student: {r['student_layers']} of the pre-trained base's layers with its embedding, "
            f"head and MTP module ({r['student_params'] / 1e6:.2f}M parameters against the "
            f"teacher's {r['teacher_params'] / 1e6:.2f}M; DistilBERT's initialisation), then "
            f"forward-KL logit distillation from the final R1 model on worked solutions. "
            f"Validation cross-entropy {r['val_loss']:.4f}" + (f" (teacher {tv:.4f})" if tv else "")
            + f"; held-out pass@1 {r['eval']['accuracy']:.1%}"
            + (f" (before distillation {ie['accuracy']:.1%})" if ie else "")
            + f", pass@{r['eval']['k']} {r['eval']['pass@k']:.1%}, format "
            f"{r['eval']['format_rate']:.1%}."
        )  # fmt: skip
        md.append("")
        md += _img(plots, "distill_loss", "distillation loss")
    if "speculative" in res:
        r = res["speculative"]
        md += ["", "## Generation: plain vs MTP speculative decoding", ""]
        md.append(
            f"Final model, greedy, batch 1, {r['prompts']} held-out prompts x {r['new_tokens']} "
            f"new tokens, {r['threads']} threads: plain {r['plain_tokens_per_s']:.1f} tokens/s, "
            f"MTP {r['mtp_tokens_per_s']:.1f} tokens/s ({r['speedup']:.2f}x); acceptance "
            f"{', '.join(f'{a:.1%}' for a in r['acceptance'])}, {r['tokens_per_step']:.2f} "
            f"tokens per verify step; outputs identical: "
            f"{'yes' if r['greedy_identical'] else 'NO (a bug)'}."
        )
        md.append("")
        md += _img(plots, "decode_speed", "decode speed")
        md += ["Sample (first prompt):", "", "```", r["sample"].strip()[:600], "```"]
    return md


def _hyperparameters(out: str, eff: SpeedrunOptions, res: dict, stages: list[str]) -> list[str]:
    md = ["", "## Effective hyperparameters", "", "<details><summary>speedrun options</summary>",
          "", "```json", json.dumps(dataclasses.asdict(eff), indent=1), "```", "</details>"]  # fmt: skip
    files = {"pretrain": "pretrain/options.json", "distill": "distill/options.json"}
    for s in ("cold_start", "reasoning_rl", "rejection_sft", "final_rl"):
        files[f"r1/{s}"] = f"r1/{s}/options.json"
    files["r1/rejection sampling"] = "r1/rejection_sft/samples.json"  # its "options" entry
    for name, rel in files.items():
        path = os.path.join(out, rel)
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            body = json.dumps(data.get("options", data) if rel.endswith("samples.json") else data,
                              indent=1)  # fmt: skip
            md += ["", f"<details><summary>{name} ({rel})</summary>", "", "```json", body,
                   "```", "</details>"]  # fmt: skip
    return md
