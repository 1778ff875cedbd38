"""The main job over several seeds: every headline number per seed, its min and median, and
which of R1's claims held in which seed.

    python experiments/speedrun_seeds.py --out runs/seeds                  # seeds 0 1 2, one by one
    python experiments/speedrun_seeds.py --out runs/seeds --seeds 0 1 2 3 --parallel 2
    python experiments/speedrun_seeds.py --out runs/seeds -- --grpo_lr=1e-4  # speedrun options

Each seed is `nanoseek speedrun --out OUT/seed-N --seed=N` in its own process (a re-run skips
finished seeds and stages, so an interrupted sweep continues). `--parallel 2` runs two seeds at
a time with one torch thread each: about the same total time on a 2-core machine, but every
stage's wall time doubles, so the per-seed wall times are then not the main job's.

Writes OUT/seeds.json (headlines, checks) and OUT/seeds.md (the table the README shows). A claim
counts as reproduced only when it holds in every seed: the default seed is not special.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (name, test on one seed's headline + base pass@k); the thresholds are the ones R1's claims need
# to be visible at this scale, fixed before the runs
CHECKS = (
    ("base pass@1 in [5%, 50%]", lambda h: 0.05 <= h["base_pass1"] <= 0.50),
    ("base pass@k > pass@1 + 10 points", lambda h: h["base_passk"] >= h["base_pass1"] + 0.10),
    ("R1-Zero >= base + 20 points", lambda h: h["r1_zero_pass1"] >= h["base_pass1"] + 0.20),
    ("reasoning RL >= cold start + 10 points",
     lambda h: h["reasoning_rl_pass1"] >= h["cold_start_pass1"] + 0.10),
    ("final >= R1-Zero", lambda h: h["final_pass1"] >= h["r1_zero_pass1"]),
    ("distilled student >= RL student + 10 points",
     lambda h: h["student_distilled_pass1"] >= h["student_rl_pass1"] + 0.10),
    ("MTP output identical", lambda h: h["mtp_identical"] is True),
    ("wall time <= 15 min", lambda h: h["wall_s"] <= 15 * 60),
)  # fmt: skip
NUMBERS = ("base_pass1", "base_passk", "r1_zero_pass1", "cold_start_pass1", "reasoning_rl_pass1",
           "final_pass1", "student_distilled_pass1", "student_rl_pass1", "mtp_speedup", "wall_s")  # fmt: skip


def run_seed(out: str, seed: int, threads: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanoseek", "speedrun", "--out", os.path.join(out, f"seed-{seed}"),
           f"--seed={seed}", *([f"--threads={threads}"] if threads else []), *extra]  # fmt: skip
    log = open(os.path.join(out, f"seed-{seed}.log"), "a")
    print(f"seed {seed}: {' '.join(cmd)}", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def headline(out: str, seed: int) -> dict | None:
    path = os.path.join(out, f"seed-{seed}", "report.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        card = json.load(f)
    head = dict(card["headline"])
    if any(head.get(k) is None for k in head):
        return None  # a stage has not finished
    base = card["stages"]["r1_zero"]["result"]["summary"]["stages"][0]
    head["base_passk"] = next(v for k, v in base.items() if k.startswith("pass@") and k != "pass@1")
    return head


def table(heads: dict[int, dict]) -> str:
    def fmt(key: str, v: float) -> str:
        if key == "wall_s":
            return f"{int(v // 60)}m{int(v % 60):02d}s"
        return f"{v:.2f}x" if key == "mtp_speedup" else f"{v:.1%}"

    seeds = sorted(heads)
    lines = ["| number | " + " | ".join(f"seed {s}" for s in seeds) + " | min | median |",
             "|---|" + "---:|" * (len(seeds) + 2)]  # fmt: skip
    for key in NUMBERS:
        vals = [heads[s][key] for s in seeds]
        lines.append(f"| {key} | " + " | ".join(fmt(key, v) for v in vals)
                     + f" | {fmt(key, min(vals))} | {fmt(key, statistics.median(vals))} |")  # fmt: skip
    lines += ["", "| claim | " + " | ".join(f"seed {s}" for s in seeds) + " | all seeds |",
              "|---|" + "---|" * (len(seeds) + 1)]  # fmt: skip
    for name, test in CHECKS:
        ok = [bool(test(heads[s])) for s in seeds]
        lines.append(f"| {name} | " + " | ".join("yes" if x else "**no**" for x in ok)
                     + f" | {'yes' if all(ok) else '**no**'} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=1, help="seeds run at once")
    ap.add_argument("extra", nargs="*", help="speedrun options after --, e.g. -- --grpo_lr=1e-4")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.parallel) if args.parallel > 1 else 0
    todo = [s for s in args.seeds if headline(args.out, s) is None]
    running: list[tuple[int, subprocess.Popen]] = []
    t0 = time.perf_counter()
    while todo or running:
        while todo and len(running) < args.parallel:
            seed = todo.pop(0)
            running.append((seed, run_seed(args.out, seed, threads, args.extra)))
        time.sleep(2)
        for seed, proc in list(running):
            if proc.poll() is not None:
                running.remove((seed, proc))
                print(f"seed {seed}: exit {proc.returncode} after "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    heads = {s: h for s in args.seeds if (h := headline(args.out, s)) is not None}
    missing = sorted(set(args.seeds) - set(heads))
    if missing:
        sys.exit(f"seeds {missing} did not finish: see {args.out}/seed-N.log")
    md = table(heads)
    with open(os.path.join(args.out, "seeds.md"), "w") as f:
        f.write(md + "\n")
    checks = {name: {s: bool(test(heads[s])) for s in heads} for name, test in CHECKS}
    with open(os.path.join(args.out, "seeds.json"), "w") as f:
        json.dump({"headlines": heads, "checks": checks, "extra": args.extra}, f, indent=1)
    print(md)


if __name__ == "__main__":
    main()
