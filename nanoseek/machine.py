"""The machine a measurement ran on: CPU model, cores, torch threads, versions, GPU.

Every figure nanoseek prints (the main job's report card, the benchmarks) names its machine, so
that numbers from different machines are never compared as if they were one.
"""

from __future__ import annotations

import os
import platform
import time

import torch


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def matmul_peak(
    dtype: torch.dtype = torch.float32, sizes=(1024, 2048, 3072), reps: int = 3
) -> float:
    """Best FLOP/s of n x n @ n x n in `dtype` on this machine, at the current torch threads:
    the denominator of MFU (bf16 and fp32 differ ~7x on CPUs with AMX tiles, ~3x without)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up: oneDNN / MKL pick their kernels on the first call
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def read_bandwidth(mbytes: int = 512, reps: int = 5) -> float:
    """Best bytes/s of streaming a `mbytes` MB fp32 tensor through a reduction, at the current
    torch threads: the roofline of a decode step, which reads every active weight once. The
    tensor is larger than the caches of the machines this runs on (up to a 480 MB L3), so the
    figure is DRAM's, not the cache's."""
    x = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32)
    x.sum()  # first touch: page faults are not bandwidth
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0))
    return best


def banner(measure: bool = True) -> str:
    """Lines naming the machine (CPU, cores, threads, torch) and, with `measure`, the bf16 and
    fp32 matmul peaks and the read bandwidth measured now: every benchmark prints it first."""
    m = machine_info()
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with "
             f"{m['threads']} threads" + (f", GPU {m['cuda']}" if m["cuda"] else "")]  # fmt: skip
    if measure:
        bf16, fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
        bw = read_bandwidth()
        lines.append(f"measured now: matmul peak bf16 {bf16 / 1e9:,.0f} GFLOP/s, fp32 "
                     f"{fp32 / 1e9:,.0f} GFLOP/s; read bandwidth {bw / 1e9:.1f} GB/s")  # fmt: skip
    return "\n".join(lines)
