"""Native GEMV kernels for decoding (nanoseek/infer/gemv.c), built when first needed.

Shape legend: G matrices, M activation rows, K in features, O out features.

PyTorch's CPU kernels leave bandwidth unused where decoding spends its time: one bf16 row
against a [O, K] matrix streams at 8-11 GB/s on one core of a machine that reads 12 (torch.mv),
int8 weights at ~6 (`_weight_int8pack_mm`, which also takes its activations in bf16).
gemv.c streams bf16 with vdpbf16ps, and int8 weights with vpdpwssd against the activations as
int16 (one scale per row: ~15 bits, so the result is as exact as the weights' int8 allows,
where llama.cpp's q8_0 rounds the activations to int8 per block of 32), four weight rows per
activation load and a software prefetch ahead in each row. Measured on one core of an Intel
Xeon (AMX; 2026-12-07) against a read bandwidth of ~12 GB/s, with weights cycled through DRAM:
int8 8.6-9.5 GB/s against ATen's 5.8-6.3, bf16 9.4-11.0 against torch.mv's 7.0-11.8
(`python bench/gemv.py --dtype bf16|int8` compares them on the machine it runs on).

The C source ships with the package and is compiled once per process with the system's C
compiler (`cc -O3 -march=native -fopenmp`, ~1 s) into a private temporary directory, so no
binary is ever loaded from a cache another process could have written. It needs x86-64 with
AVX-512 BF16 and VNNI (Intel Sapphire Rapids and later, AMD Zen 4 and later) and a compiler;
anywhere else, or with NANOSEEK_NATIVE=0, `kernels()` is None and the callers keep PyTorch's
kernels (`reason()` says why). tests/infer/test_native.py checks both against PyTorch.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv.c")
ABI = 1  # gemv.c's ABI: the argument lists below
MAX_ROWS = 8  # activation rows a native call takes; more go to PyTorch's GEMMs
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
ENV = "NANOSEEK_NATIVE"

_reason = "not built yet"


def reason() -> str:
    """Why `kernels()` is None, or "available"."""
    kernels()
    return _reason


@lru_cache(maxsize=1)
def kernels() -> Kernels | None:
    """The loaded kernels, or None where they cannot be built or used (see `reason()`)."""
    global _reason
    if os.environ.get(ENV, "1") == "0":
        _reason = f"{ENV}=0"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _reason = f"no kernels for {platform.machine()}"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _reason = "no C compiler (cc / gcc) on PATH"
        return None
    out = Path(tempfile.mkdtemp(prefix="nanoseek-native-")) / "gemv.so"
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out)], check=True,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
        lib = ctypes.CDLL(str(out))  # after torch: libgomp.so.1 binds to torch's OpenMP runtime
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        _reason = f"{cc} could not build {SOURCE.name}: {err.strip().splitlines()[-1:]}"
        return None
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)  # the mapping stays valid once loaded
    if lib.nanoseek_gemv_abi() != ABI:
        _reason = f"{SOURCE.name} has ABI {lib.nanoseek_gemv_abi()}, this module {ABI}"
        return None
    if not lib.nanoseek_gemv_supported():
        _reason = "the CPU (or compiler) lacks AVX-512 BF16 / VNNI"
        return None
    _reason = "available"
    return Kernels(lib)


_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


class Kernels:
    """ctypes bindings of gemv.c; every tensor must be contiguous CPU memory."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.nanoseek_gemv_bf16.argtypes = [_P, _L, _P, _P, _P, _I, _I, _I, _I, _I]
        lib.nanoseek_gemv_q8.argtypes = [_P, _L, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I]
        self._offsets: dict[tuple, torch.Tensor] = {}

    def _woff(self, G: int, size: int) -> torch.Tensor:
        """Element offsets of G matrices of `size` elements laid one after the other."""
        key = (G, size)
        t = self._offsets.get(key)
        if t is None:
            t = self._offsets[key] = torch.arange(G, dtype=torch.int64) * size
        return t

    def bf16(self, x: torch.Tensor, w: torch.Tensor, out_dtype=torch.bfloat16) -> torch.Tensor:
        """x [M,K] or [G,M,K] bf16, w [O,K] or [G,O,K] bf16 (contiguous) -> x @ w^T [(G,)M,O]."""
        n_out, k = w.shape[-2:]
        g, m = (1, x.shape[0]) if w.dim() == 2 else x.shape[:2]
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], n_out, dtype=out_dtype)
        self.lib.nanoseek_gemv_bf16(
            x.data_ptr(), m * k, w.data_ptr(), self._woff(g, n_out * k).data_ptr(), y.data_ptr(),
            g, m, k, n_out, out_dtype == torch.bfloat16,
        )  # fmt: skip
        return y

    def q8(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out_dtype) -> torch.Tensor:
        """x [M,K] or [G,M,K] (any float; int16 inside, one scale per row), q int8 [O,K] or
        [G,O,K], scale bf16 [O] or [G,O] -> x @ (q * scale)^T [(G,)M,O] in out_dtype (fp32 or
        bf16)."""
        n_out, k = q.shape[-2:]
        g, m = (1, x.shape[0]) if q.dim() == 2 else x.shape[:2]
        xf = x.float().contiguous()
        y = torch.empty(*x.shape[:-1], n_out, dtype=out_dtype)
        self.lib.nanoseek_gemv_q8(
            xf.data_ptr(), m * k, q.data_ptr(), self._woff(g, n_out * k).data_ptr(),
            scale.data_ptr(), self._woff(g, n_out).data_ptr(), y.data_ptr(),
            g, m, k, n_out, out_dtype == torch.bfloat16,
        )  # fmt: skip
        return y
