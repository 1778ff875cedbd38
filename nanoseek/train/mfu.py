"""Model FLOPs utilisation: achieved model FLOP/s over the machine's measured matmul peak.

The peak is measured, not looked up: the best of a few large square matmuls in the training
dtype on this machine (on this project's 2-core AVX-512-BF16 CPU, bf16 runs ~2.7x fp32).
"""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def matmul_peak_flops(
    dtype: torch.dtype = torch.float32, device="cpu", sizes=(1024, 2048), reps: int = 3
) -> float:
    """Best FLOP/s of n x n @ n x n over `sizes`, `reps` timed runs each after one warm-up."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best
