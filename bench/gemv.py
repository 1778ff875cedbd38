"""How fast can one decode step read its weights? GEMV bandwidth of every CPU kernel PyTorch has,
and of nanoseek's native ones.

    python bench/gemv.py                 # one thread, fp32, the bench model's decode shapes
    python bench/gemv.py --threads 2
    python bench/gemv.py --threads 2 --dtype bf16 --rows 2 --shapes big   # the 803M model's shapes
    python bench/gemv.py --dtype int8 --shapes big --pool-mb 600          # int8 weights

At batch 1 a decode step multiplies one activation row by every weight it touches, so its GEMMs
are matrix-vector products bound by how fast the weights stream in. The routed experts rotate
from token to token, so their weights come from DRAM, not cache. This script times
[1, K] x [K, N] for the decode shapes of the model-core benchmark model (bench/train_step.py:
expert gate+up 256 -> 512, expert down 256 -> 256, the head 256 -> 8192), cycling through
enough different matrices (more than the L3 cache holds) that each one is read from memory, with
each kernel PyTorch offers on CPU:
    F.linear      x @ W^T with W in nn.Linear's [out, in] layout
    x @ W^T       the transposed copy [in, out] contiguous (what nanoseek's decode path keeps)
    mv            torch.mv(W, x)
    mkl packed    MKL's packed sgemm (torch.ops.mkl._mkl_linear, what inductor uses for fp32)
    onednn packed oneDNN's linear on a reordered weight (torch.ops.mkldnn._linear_pointwise)
    native        nanoseek's kernel (nanoseek/infer/native.py; bf16 and fp32, where it builds)
and for --dtype int8 (per-output-channel int8 weights, as `quantize="int8"` keeps them):
    int8pack      ATen's torch._weight_int8pack_mm (bf16 activations)
    native        nanoseek's kernel (int16 activations)
and prints microseconds per call and GB/s of weights read. bench/decode.py --gemm-split turns
these rates into the ceiling of a decode step.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nanoseek.infer import native
from nanoseek.infer.quant import NATIVE_ROWS, Int8Weight
from nanoseek.machine import banner

SHAPES = {"expert gate+up": (256, 512), "expert down": (256, 256), "head": (256, 8192)}
# bench/vs_llamacpp.py's 803M model: a dense MLP's up / an attention projection / its experts
BIG_SHAPES = {"mlp up / head": (1024, 4096), "q_b": (512, 3072), "expert gate+up": (1024, 1024),
              "expert down": (512, 1024)}  # fmt: skip


def int8_kernels(x: torch.Tensor, ws: list[Int8Weight]) -> dict:
    """name -> f(i) computing x @ ws[i]^T for int8 weights."""
    xb = x.bfloat16()
    out = {"int8pack": lambda i: torch._weight_int8pack_mm(xb, ws[i].q, ws[i].scale)}
    lib = native.kernels()
    if lib is not None and x.shape[0] <= NATIVE_ROWS:
        out["native"] = lambda i: lib.q8(x, ws[i].q, ws[i].scale, torch.float32)
    return out


def kernels(x: torch.Tensor, ws: list[torch.Tensor]) -> dict:
    """name -> f(i) computing x @ ws[i]^T; kernels this build lacks are left out."""
    lib = native.kernels()
    own = {}
    if lib is not None and x.shape[0] <= native.MAX_ROWS:
        own = {"native": lambda i: (lib.bf16 if x.dtype == torch.bfloat16 else lib.f32)(x, ws[i])}
    wts = [w.t().contiguous() for w in ws]
    out = {
        "F.linear": lambda i: F.linear(x, ws[i]),
        "x @ W^T": lambda i: x @ wts[i],
    }
    if x.shape[0] == 1:
        out["mv"] = lambda i: torch.mv(ws[i], x[0])
    try:
        rows = x.shape[0]
        mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in ws]
        out["mkl packed"] = lambda i: torch.ops.mkl._mkl_linear(x, mkl[i], ws[i], None, rows)
    except (AttributeError, RuntimeError):
        pass
    try:
        dnn = [torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0]) for w in ws]
        out["onednn packed"] = lambda i: torch.ops.mkldnn._linear_pointwise(
            x, dnn[i], None, "none", [], ""
        )
    except (AttributeError, RuntimeError):
        pass
    return out | own


def per_call(fn, n: int, reps: int) -> float:
    """Best over `reps` passes of the mean seconds per call over the n matrices."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pool-mb", type=int, default=128, help="weights cycled through per shape")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32")
    p.add_argument("--rows", type=int, default=1, help="activation rows (2: a verify step)")
    p.add_argument("--shapes", choices=["bench", "big"], default="bench")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[args.dtype]
    print(banner())  # the machine, its matmul peaks and read bandwidth, measured now
    print(f"native kernels: {native.reason()}")
    print(f"{args.dtype}, {args.rows} row(s), {args.threads} thread(s), {args.pool_mb} MB of "
          "weights cycled per shape")  # fmt: skip
    for name, (k, n) in (BIG_SHAPES if args.shapes == "big" else SHAPES).items():
        nbytes = k * n * dtype.itemsize
        count = max(2, args.pool_mb * 2**20 // nbytes)
        if dtype == torch.int8:
            ws = [Int8Weight.quantize(torch.randn(n, k)) for _ in range(count)]
            x = torch.randn(args.rows, k)
            table = int8_kernels(x, ws)
        else:
            ws = [torch.randn(n, k).to(dtype) for _ in range(count)]
            x = torch.randn(args.rows, k).to(dtype)
            table = kernels(x, ws)
        cells = []
        for kname, fn in table.items():
            fn(0)  # warm-up
            s = per_call(fn, count, args.reps)
            cells.append(f"{kname} {s * 1e6:.0f} us ({nbytes / s / 1e9:.1f} GB/s)")
        print(f"{name:15s} [{args.rows},{k}] x [{k},{n}] ({nbytes / 1e6:.2f} MB): "
              + ", ".join(cells))  # fmt: skip


if __name__ == "__main__":
    main()
