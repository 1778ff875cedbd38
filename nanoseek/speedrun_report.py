"""The speedrun's report card: OUT/report.md, its plots under OUT/plots/, OUT/report.json.

Written from the stages' DONE files only (speedrun.py), so it can be rewritten at any time - after
every stage, or by a re-run that skipped them all - and always shows exactly what finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

from nanoseek.analysis.plots import plot_bars, plot_panels, read_metrics
from nanoseek.train.pipeline import duration, format_table, read_done, write_json

if TYPE_CHECKING:  # the main job imports this module: only its annotations name the options
    from nanoseek.speedrun import SpeedrunOptions


def write_report(opts: SpeedrunOptions, eff: SpeedrunOptions, stages: list[str],
                 machine: dict) -> dict:  # fmt: skip
    """Write OUT/report.md (+ plots, report.json) from the finished stages; returns the data."""
    out = opts.out
    done = {s: read_done(os.path.join(out, s)) for s in stages}
    done = {s: d for s, d in done.items() if d is not None}
    res = {s: d["result"] for s, d in done.items()}
    plots = _plots(out, res)
    total = sum(d["wall_s"] for d in done.values())
    head = headline(res, total)
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
    md += _headline_table(head)
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
    card = {"headline": head, "options": dataclasses.asdict(opts), "machine": machine,
            "stages": done, "total_wall_s": total, "plots": plots}  # fmt: skip
    write_json(os.path.join(out, "report.json"), card)
    return card


HEADLINE_KEYS = ("base_pass1", "r1_zero_pass1", "cold_start_pass1", "reasoning_rl_pass1",
                 "final_pass1", "student_distilled_pass1", "student_rl_pass1", "mtp_speedup",
                 "mtp_identical", "wall_s")  # fmt: skip


def headline(res: dict, total_wall_s: float) -> dict:
    """The numbers R1's claims rest on, flat (None: that stage has not finished)."""
    rows = {}
    for stage in ("r1_zero", "r1"):
        for row in res.get(stage, {}).get("summary", {}).get("stages", []):
            rows[f"{stage}/{row['stage']}"] = row["pass@1"]
    spec = res.get("speculative", {})
    return {
        "base_pass1": rows.get("r1_zero/base", rows.get("r1/base")),
        "r1_zero_pass1": rows.get("r1_zero/rl"),
        "cold_start_pass1": rows.get("r1/cold_start"),
        "reasoning_rl_pass1": rows.get("r1/reasoning_rl"),
        "final_pass1": rows.get("r1/final_rl"),
        "student_distilled_pass1": res.get("distill", {}).get("eval", {}).get("accuracy"),
        "student_rl_pass1": res.get("student_rl", {}).get("eval", {}).get("pass@1"),
        "mtp_speedup": spec.get("speedup"),
        "mtp_identical": spec.get("greedy_identical"),
        "wall_s": total_wall_s,
    }


def _headline_table(h: dict) -> list[str]:
    def pct(key: str) -> str:
        return "-" if h[key] is None else f"{h[key]:.1%}"

    def gain(a: str, b: str) -> str:
        return "" if h[a] is None or h[b] is None else f" ({100 * (h[a] - h[b]):+.1f} points)"

    md = ["", "## Headline: held-out pass@1 (R1's measure: mean of k samples at temperature 0.6)",
          "", "| claim | result |", "|---|---|",
          f"| base (pre-trained only) | {pct('base_pass1')} |",
          f"| R1-Zero: GRPO from the base, rule rewards, no SFT [R1 §2.2] | "
          f"{pct('r1_zero_pass1')}{gain('r1_zero_pass1', 'base_pass1')} |",
          f"| R1: cold start [§2.3.1] | {pct('cold_start_pass1')} |",
          f"| R1: reasoning RL after the cold start [§2.3.2] | "
          f"{pct('reasoning_rl_pass1')}{gain('reasoning_rl_pass1', 'cold_start_pass1')} |",
          f"| R1: final model (rejection SFT + RL) [§2.3.3-4] | "
          f"{pct('final_pass1')}{gain('final_pass1', 'r1_zero_pass1')} vs R1-Zero |",
          f"| small student distilled from the final model [§4.1] | "
          f"{pct('student_distilled_pass1')} |",
          f"| the same student trained with GRPO for the same time [§4.1] | "
          f"{pct('student_rl_pass1')}{gain('student_distilled_pass1', 'student_rl_pass1')} "
          "distilled vs RL |"]  # fmt: skip
    if h["mtp_speedup"] is not None:
        md.append(f"| MTP speculative decoding [V3 §2.2] | {h['mtp_speedup']:.2f}x, identical "
                  f"output: {'yes' if h['mtp_identical'] else 'NO'} |")  # fmt: skip
    return md


def _headline(stage: str, r: dict) -> str:
    if stage == "tokenizer":
        return f"{r['documents']:,} documents, vocabulary {r['vocab_size']:,}"
    if stage == "pretrain":
        val = r["val_loss"]
        v = f"val loss {val[0][1]:.3f} -> {val[-1][1]:.3f}, " if val else ""
        base = f", base: step {r['base_choice']['step']}" if r.get("base_choice") else ""
        return (f"{r['steps']} steps ({r['precision']}), {v}MaxVio {r['maxvio_global_end']:.3f}, "
                f"{r['tokens_per_s']:,.0f} tokens/s{base}")  # fmt: skip
    if stage == "fp8_vs_bf16":
        return f"relative loss gap {r['rel_diff']:.3%} after {r['steps']} steps"
    if stage in ("r1_zero", "student_rl"):
        rows = r["summary"]["stages"]
        return f"held-out pass@1 {rows[0]['pass@1']:.1%} -> {rows[-1]['pass@1']:.1%} (GRPO)"
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
    plots = {}
    for name, rel in (("pretrain_loss", "pretrain/loss.png"),
                      ("expert_load", "pretrain/expert_load.png"),
                      ("fp8_vs_bf16", "fp8_vs_bf16/fp8_vs_bf16.png"),
                      ("reward_reasoning_rl", "r1/reasoning_rl/reward.png"),
                      ("reward_final_rl", "r1/final_rl/reward.png"),
                      ("distill_loss", "distill/loss.png")):  # fmt: skip
        if os.path.isfile(os.path.join(out, rel)):
            plots[name] = rel
    for stage in ("r1_zero/rl", "r1/reasoning_rl", "r1/final_rl", "student_rl/rl"):
        rel = _rl_curves(out, stage)
        if rel:
            plots[f"curves_{stage.replace('/', '_')}"] = rel
    if "r1" in res:
        acc = {}
        if "r1_zero" in res:
            acc["R1-Zero"] = res["r1_zero"]["summary"]["stages"][-1]["pass@1"]
        acc.update({row["stage"]: row["pass@1"] for row in res["r1"]["summary"]["stages"]})
        if "distill" in res:
            acc["student (distilled)"] = res["distill"]["eval"]["accuracy"]
        if "student_rl" in res:
            acc["student (RL)"] = res["student_rl"]["eval"]["pass@1"]
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


def _rl_curves(out: str, stage: str) -> str | None:
    """plots/<stage>_curves.png: accuracy reward, mean completion length and the share of groups
    with zero reward variance per GRPO step (R1's Figures 2 and 3); None without metrics."""
    path = os.path.join(out, stage, "metrics.jsonl")
    rows = [r for r in read_metrics(path) if "reward" in r] if os.path.isfile(path) else []
    if not rows:
        return None
    x = [r["step"] for r in rows]

    def curve(key: str) -> dict:
        return {key: (x, [r.get(key, 0.0) for r in rows])}

    rel = os.path.join("plots", f"{stage.replace('/', '_')}_curves.png")
    plot_panels({"accuracy reward (training)": curve("rewards/accuracy/mean"),
                 "mean completion length (tokens)": curve("completions/mean_length"),
                 "groups with zero reward variance": curve("frac_reward_zero_std")},
                os.path.join(out, rel), f"GRPO: {stage}")  # fmt: skip
    return rel


def _rl_story(out: str, stage: str, before: str) -> list[str]:
    """Zero-variance share and one held-out completion before and after, for one GRPO stage."""
    path = os.path.join(out, stage, "metrics.jsonl")
    rows = [r for r in read_metrics(path) if "reward" in r] if os.path.isfile(path) else []
    md: list[str] = []
    if rows:
        n = max(1, len(rows) // 10)
        first, last = rows[:n], rows[-n:]

        def mean(rs, key):
            return sum(r.get(key, 0.0) for r in rs) / len(rs)

        md.append(
            f"{len(rows)} GRPO steps. First / last {n} steps: accuracy reward "
            f"{mean(first, 'rewards/accuracy/mean'):.2f} -> {mean(last, 'rewards/accuracy/mean'):.2f}"
            f", mean completion length {mean(first, 'completions/mean_length'):.0f} -> "
            f"{mean(last, 'completions/mean_length'):.0f} tokens, groups with zero reward variance "
            f"(no learning signal) {mean(first, 'frac_reward_zero_std'):.0%} -> "
            f"{mean(last, 'frac_reward_zero_std'):.0%}."
        )  # fmt: skip
        md.append("")
    pre, post = read_done(os.path.join(out, before)), read_done(os.path.join(out, stage))
    if pre and post and pre["eval"].get("samples") and post["eval"].get("samples"):
        a, b = pre["eval"]["samples"][0], post["eval"]["samples"][0]
        md += [f"The first held-out problem, `{a['question']}` (answer {a['answer']}), before "
               f"({'right' if a['correct'] else 'wrong'}) and after "
               f"({'right' if b['correct'] else 'wrong'}) this stage:", "",
               "```", a["completion"].strip()[:500], "```", "", "```",
               b["completion"].strip()[:500], "```", ""]  # fmt: skip
    return md


def _reply_tokens(r: dict) -> str:
    """The speculative stage's reply lengths (a result without `reply_tokens` decoded
    `new_tokens` a prompt, past the replies' end)."""
    if "reply_tokens" not in r:
        return f"{r['new_tokens']} new tokens each, past the replies' end"
    return (
        f"each reply to its end ({r['reply_tokens']:.1f} tokens on average, at most "
        f"{r['new_tokens']})"
    )


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
        if r.get("base_choice"):
            c = r["base_choice"]
            pts = ", ".join(f"step {s}: {v['pass@1']:.1%}" for s, v in c["checked"].items())
            md.append(f"The base is the newest checkpoint whose pass@1 on train-split problems "
                      f"is at most {c['max_pass1']:.0%} (newest first: {pts}): step {c['step']}"
                      + ("." if c["qualified"] else ", the lowest; none qualified."))  # fmt: skip
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

    if "r1_zero" in res:
        md += ["", "## R1-Zero: RL straight from the base [R1 §2.2]", ""]
        md.append(format_table(res["r1_zero"]["summary"]))
        md.append("")
        md += _img(plots, "curves_r1_zero_rl", "R1-Zero reward, length, zero-variance groups")
        md += _rl_story(out, "r1_zero/rl", "r1_zero/base")
    if "r1" in res:
        md += ["", "## R1 pipeline (held-out accuracy of every stage)", ""]
        md.append(format_table(res["r1"]["summary"]))
        md.append("")
        md += _img(plots, "accuracy", "held-out accuracy per stage")
        md += _img(plots, "curves_r1_reasoning_rl", "reasoning RL curves")
        md += _rl_story(out, "r1/reasoning_rl", "r1/cold_start")
        md += _img(plots, "curves_r1_final_rl", "final RL curves")
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
    if "student_rl" in res:
        r = res["student_rl"]
        md += ["", "## The same student trained with RL instead [R1 §4.1]", ""]
        md.append(
            f"GRPO from the distillation's student initialisation in the base's prompt format, "
            f"for the distillation's training time ({r['budget_s']:.0f} s; GRPO ran "
            f"{r['train_s']:.0f} s, {r['steps']} steps): held-out pass@1 "
            f"{r['summary']['stages'][0]['pass@1']:.1%} -> {r['eval']['pass@1']:.1%}"
            + (f", against {res['distill']['eval']['accuracy']:.1%} distilled" if "distill" in res
               else "") + "."
        )  # fmt: skip
        md.append("")
        md += _img(plots, "curves_student_rl_rl", "student GRPO curves")
    if "speculative" in res:
        r = res["speculative"]
        md += ["", "## Generation: plain vs MTP speculative decoding", ""]
        md.append(
            f"Final model, greedy, batch 1, {r['prompts']} held-out prompts, {_reply_tokens(r)}, "
            f"{r['threads']} threads: plain "
            f"{r['plain_tokens_per_s']:.1f} tokens/s, "
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
    files["r1_zero/rl"] = "r1_zero/rl/options.json"
    files["student_rl/rl"] = "student_rl/rl/options.json"
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
