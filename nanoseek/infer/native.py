"""Native kernels for decoding (nanoseek/infer/gemv.c, moe.c, mla.c, layer.c), built when
first needed.

Shape legend: G matrices, M activation rows, K in features, O out features.

PyTorch's CPU kernels leave bandwidth unused where decoding spends its time: one bf16 row
against a [O, K] matrix streams at 8-11 GB/s on one core of a machine that reads 12 (torch.mv),
int8 weights at ~6 (`_weight_int8pack_mm`, which also takes its activations in bf16), and a
decode step of PyTorch's operators pays microseconds for each of hundreds of them. gemv.c
streams bf16 with vdpbf16ps, fp32 with vfmadd (an fp32 model's own weights; no W^T copies),
and int8 weights with vpdpwssd against the activations as int16 (one scale per row: ~15 bits,
so the result is as exact as the weights' int8 allows, where llama.cpp's q8_0 rounds the
activations to int8 per block of 32). A few activation rows read the weights row after row,
one stream through memory; more rows take 4 x 4 tiles, four weight rows per activation load.
Measured on one core of an Intel Xeon (AMX; 2026-12-07, 4 x 4 tiles at every row count) against
a read bandwidth of ~12 GB/s, with weights cycled through DRAM: int8 8.6-11.8 GB/s against
ATen's 5.8-6.9, bf16 9.4-11.0 against torch.mv's 7.0-11.8; fp32 at MKL's rate (`python
bench/gemv.py --dtype fp32|bf16|int8 --pool-mb 1200` compares them on the machine it runs
on). A decode step of up to 8 rows is one call per decoder layer (layer.c).

The C sources ship with the package and are compiled once per process with the system's C
compiler (`cc -O3 -march=native -fopenmp`, ~2 s here) into a private temporary directory, so
no binary is ever loaded from a cache another process could have written. They need x86-64
with AVX-512 BF16 and VNNI (Intel Sapphire Rapids and later, AMD Zen 4 and later) and a
compiler; anywhere else, or with NANOSEEK_NATIVE=0, `kernels()` is None and the callers keep
PyTorch's kernels (`reason()` says why). tests/infer/test_native.py, test_mla_decode.py and
test_layer_decode.py check them against PyTorch and the modules' compositions.
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

# the C sources, built into one library: products, norms (gemv.c, whose ABI this module checks);
# the MoE's pieces (moe.c); MLA (mla.c); a decoder layer (layer.c); what they share (native.h)
SOURCES = [Path(__file__).with_name(f) for f in ("gemv.c", "moe.c", "mla.c", "layer.c")]
ABI = 13  # gemv.c's ABI: the argument lists below
# tokens the fused calls take (a decode step of up to 8 rows, a verify step) and rows the fp32
# products take; int8 products take up to quant.NATIVE_ROWS, bf16 1-2 (quant.py): from 4 rows
# on MKL's bf16 GEMM is faster (`python bench/gemv.py --dtype bf16 --rows 4`)
MAX_ROWS = 8
# fp32 tokens the native calls take: a rollout's or an evaluation's batch of decode rows (the
# speedrun model's 128-row step 2.6 ms through them, 7.0-7.5 ms through PyTorch's operators;
# the 803M model's 64-row fp32 step 217-222 against 309-320 ms; Intel Xeon, 2 threads,
# 2026-12-07). Their results for a row depend neither on the other rows nor on the threads
# (tests/infer/test_layer_decode.py).
F32_ROWS = 256
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
        subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(out)], check=True,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
        lib = ctypes.CDLL(str(out))  # after torch: libgomp.so.1 binds to torch's OpenMP runtime
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        last = (err.strip().splitlines() or [""])[-1]
        _reason = f"{cc} could not build the native kernels: {last}"
        return None
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)  # the mapping stays valid once loaded
    if lib.nanoseek_gemv_abi() != ABI:
        _reason = f"gemv.c has ABI {lib.nanoseek_gemv_abi()}, this module {ABI}"
        return None
    if not lib.nanoseek_gemv_supported():
        _reason = "the CPU (or compiler) lacks AVX-512 BF16 / VNNI"
        return None
    _reason = "available"
    return Kernels(lib)


def kernels_for(x: torch.Tensor) -> Kernels | None:
    """`kernels()` for a CPU tensor x, None for any other device (the kernels take host
    pointers)."""
    return kernels() if x.device.type == "cpu" else None


_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_IDS, _FLOATS = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float)
DTYPES = (torch.float32, torch.bfloat16)  # what the kernels read and write
ROUTE_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")  # moe.c's enum, in order
BF16, Q8, F32 = 0, 1, 2  # native.h's weight kinds: bf16 rows, int8 rows with scales, fp32 rows


def route_config(router) -> tuple:
    """(E, groups, topk_group, K, softmax?, method, normalise?, scale) of a Router, in the order
    moe.c's `nanoseek_route` (and layer.c's plan) take them."""
    return (router.n_experts, router.n_group, router.topk_group, router.top_k,
            router.scoring_func == "softmax", ROUTE_METHODS.index(router.topk_method),
            router.norm_topk_prob, router.routed_scaling_factor)  # fmt: skip


def weight_kind(w: torch.Tensor, scales: torch.Tensor | None) -> int:
    """The kind of weight rows w (int8 when they come with scales)."""
    if scales is not None:
        return Q8
    return F32 if w.dtype == torch.float32 else BF16


def _host(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x as contiguous memory of `dtype` (default: its own) for a C pointer, with no operator
    dispatched where x already is that."""
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x if x.is_contiguous() else x.contiguous()


_F = ctypes.c_float


class LayerPlan(ctypes.Structure):
    """layer.c's `layer_plan`, field by field: what `nanoseek_layer_decode` needs of a decoder
    layer (pointers into the decode weights, which the owner keeps alive)."""

    _fields_ = [
        *[(n, _P) for n in ("ln1", "ln2")], ("eps1", _F), ("eps2", _F),
        ("mla_w", _P * 5), ("mla_s", _P * 5), ("q_norm", _P), ("kv_norm", _P),
        ("eps_q", _F), ("eps_kv", _F), ("scale", _F),
        *[(n, _I) for n in ("D", "QL", "H", "N", "R", "C", "V")],
        *[(n, _P) for n in ("sw1", "sw2", "ss1", "ss2")], ("SF", _I),
        *[(n, _P) for n in ("ew1", "ew2", "es1", "es2")], ("EF", _I),
        ("gate", _P), ("gate_bias", _P), ("route_scale", _F),
        *[(n, _I) for n in ("E", "n_group", "topk_group", "K", "softmax", "method", "norm",
                            "gate_bf16", "kind", "bf16")],
        ("bytes", ctypes.c_int64),
    ]  # fmt: skip


def layer_plan(mla_mats: list, mla_norms: tuple, mla_dims: tuple, scale: float, norms: tuple,
               shared: tuple | None, routed: tuple | None, router, kind: int,
               bf16: bool) -> LayerPlan:  # fmt: skip
    """A decoder layer's `LayerPlan`: mla_* as `Kernels.mla_args` and `mla_decode` take them;
    norms: (input, post-attention) RMSNorm modules; shared (the dense FFN or the shared experts)
    and routed (None: a dense layer): (w1 rows, scales, w2 rows, scales) as `experts_ffn`
    takes them; router: the MoE's Router or None. The caller keeps the tensors alive."""

    def ptr(t):
        return None if t is None else t.data_ptr()

    p = LayerPlan()
    p.ln1, p.ln2 = ptr(norms[0].weight), ptr(norms[1].weight)
    p.eps1, p.eps2 = norms[0].eps, norms[1].eps
    (p.mla_w, p.mla_s, p.q_norm, p.kv_norm, p.eps_q, p.eps_kv), _ = Kernels.mla_args(
        mla_mats, mla_norms
    )
    p.scale = scale
    p.D, p.QL, p.H, p.N, p.R, p.C, p.V = mla_dims
    if shared is not None:
        p.sw1, p.ss1, p.sw2, p.ss2 = map(ptr, shared)
        p.SF = shared[2].shape[-1]
    if routed is not None:
        p.ew1, p.es1, p.ew2, p.es2 = map(ptr, routed)
        p.EF = routed[2].shape[-1]
        p.gate, p.gate_bias = ptr(router.weight), ptr(router.e_score_correction_bias)
        (p.E, p.n_group, p.topk_group, p.K, p.softmax, p.method, p.norm,
         p.route_scale) = route_config(router)  # fmt: skip
        p.gate_bf16 = router.weight.dtype == torch.bfloat16
    p.kind, p.bf16 = kind, bf16
    tensors = [t for pair in mla_mats for t in pair] + [*(shared or ()), *(routed or ())]
    p.bytes = sum(t.nbytes for t in tensors if t is not None)
    return p


class Kernels:
    """ctypes bindings of the C kernels; every tensor must be contiguous CPU memory, and every
    tensor whose pointer a call takes is held in a local until the call returns (a temporary's
    `data_ptr()` would point at freed memory). A decode step makes one to ~70 of these calls, so
    they dispatch no PyTorch operator they can avoid (one `empty` for the output): each costs
    microseconds right after a kernel has streamed the caches."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.nanoseek_gemv_bf16.argtypes = [_P, _L, _P, _IDS, _P, _I, _I, _I, _I, _I]
        lib.nanoseek_gemv_f32.argtypes = lib.nanoseek_gemv_bf16.argtypes
        lib.nanoseek_gemv_q8.argtypes = [_P, _L, _P, _P, _IDS, _P, _I, _I, _I, _I, _I]
        lib.nanoseek_rmsnorm.argtypes = [_P, _P, _P, _L, _I, ctypes.c_float, _I]
        lib.nanoseek_combine.argtypes = [_P, _FLOATS, _P, _I, _I, _I]
        lib.nanoseek_experts_ffn.argtypes = [*[_P] * 5, _IDS, _FLOATS, _P, *[_I] * 6]
        lib.nanoseek_experts_grouped.argtypes = [*[_P] * 8, *[_I] * 6]
        lib.nanoseek_route.argtypes = [_P, _P, _P, _P, _P, _L, *[_I] * 8, ctypes.c_float, _I, _I]
        lib.nanoseek_mla_decode.argtypes = [*[_P] * 5, _F, _F, *[_P] * 3, _L, _P, _F, _P,
                                            *[_I] * 11]  # fmt: skip
        lib.nanoseek_layer_decode.argtypes = [ctypes.POINTER(LayerPlan), *[_P] * 5, _L, _P,
                                               *[_I] * 3]  # fmt: skip

    @staticmethod
    def _call(x: torch.Tensor, w: torch.Tensor, ids: list[int] | None, out_dtype):
        """(G, M, x's stride between matrices, ids as a C array or None, the output buffer) for
        x [..., K] with w [O,K] (M rows), x [G,M,K] with w [G,O,K], or, with ids into a stacked
        w [E,O,K], x [K] (one row for every expert) or x [len(ids), K] (one row each). The
        output is [..., O], [G,M,O] or [len(ids), O], in out_dtype if the kernels write it,
        else in fp32."""
        n_out, k = w.shape[-2:]
        kept = out_dtype if out_dtype in DTYPES else torch.float32
        if ids is not None:
            g = len(ids)
            y = torch.empty((g, n_out), dtype=kept)
            return g, 1, (0 if x.dim() == 1 else k), (ctypes.c_int64 * g)(*ids), y
        if w.dim() == 2:
            y = torch.empty((*x.shape[:-1], n_out), dtype=kept)
            return 1, x.numel() // k, 0, None, y
        g, m = x.shape[0], x.shape[1]
        return g, m, m * k, None, torch.empty((g, m, n_out), dtype=kept)

    def bf16(self, x: torch.Tensor, w: torch.Tensor, out_dtype=torch.bfloat16,
             ids: list[int] | None = None) -> torch.Tensor:  # fmt: skip
        """x bf16 @ W^T for bf16 rows w [..., O, K] (contiguous, K % 32 == 0); shapes as `_call`
        says."""
        return self._rows(self.lib.nanoseek_gemv_bf16, x, w, out_dtype, ids)

    def f32(self, x: torch.Tensor, w: torch.Tensor, out_dtype=torch.float32,
            ids: list[int] | None = None) -> torch.Tensor:  # fmt: skip
        """x fp32 @ W^T for fp32 rows w [..., O, K] (contiguous, K % 16 == 0); shapes as `_call`
        says."""
        return self._rows(self.lib.nanoseek_gemv_f32, x, w, out_dtype, ids)

    def _rows(self, fn, x, w, out_dtype, ids):
        g, m, x_gstride, c_ids, y = self._call(x, w, ids, out_dtype)
        x = _host(x)
        fn(x.data_ptr(), x_gstride, w.data_ptr(), c_ids, y.data_ptr(), g, m, w.shape[-1],
           w.shape[-2], y.dtype == torch.bfloat16)  # fmt: skip
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def q8(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out_dtype,
           ids: list[int] | None = None) -> torch.Tensor:  # fmt: skip
        """x (any float; int16 inside, one scale per row) @ (q * scale)^T for int8 rows q
        [..., O, K] with bf16 scales [..., O]; shapes as `_call` says."""
        g, m, x_gstride, c_ids, y = self._call(x, q, ids, out_dtype)
        x = _host(x, torch.float32)
        self.lib.nanoseek_gemv_q8(
            x.data_ptr(), x_gstride, q.data_ptr(), scale.data_ptr(), c_ids, y.data_ptr(),
            g, m, q.shape[-1], q.shape[-2], y.dtype == torch.bfloat16,
        )  # fmt: skip
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of x [..., D] with weight [D], both fp32 or both bf16, in one call: fp32
        statistics, the rounding order of nanoseek's RMSNorm (model/norm.py); the sum of squares
        is added in another order, so results may differ from it in the last bit."""
        x = _host(x)
        y = torch.empty_like(x)
        self.lib.nanoseek_rmsnorm(x.data_ptr(), weight.data_ptr(), y.data_ptr(),
                                  x.numel() // x.shape[-1], x.shape[-1], eps,
                                  x.dtype == torch.bfloat16)  # fmt: skip
        return y

    def experts_ffn(self, x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor | None,
                    w2: torch.Tensor, s2: torch.Tensor | None, ids: list[int],
                    gates: list[float], out: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """out [..., D] (fp32 or bf16, contiguous) += sum_k gates[k] * the SwiGLU FFN of expert
        ids[k] on each row of x [..., D] (a few), in one call: w1 [E, 2F, D] (gate rows, then up
        rows) and w2 [E, D, F] bf16 or fp32 rows (s1, s2 None), or int8 with bf16 scales
        s1 [E, 2F], s2 [E, D]. Returns out."""
        kind = weight_kind(w1, s1)
        x = _host(x, torch.bfloat16 if kind == BF16 else torch.float32)
        n = len(ids)
        c_ids, c_gates = (ctypes.c_int64 * n)(*ids), (ctypes.c_float * n)(*gates)
        self.lib.nanoseek_experts_ffn(
            x.data_ptr(), w1.data_ptr(), None if s1 is None else s1.data_ptr(), w2.data_ptr(),
            None if s2 is None else s2.data_ptr(), c_ids, c_gates, out.data_ptr(), n,
            x.numel() // x.shape[-1], w1.shape[-1], w2.shape[-1], kind,
            out.dtype == torch.bfloat16,
        )  # fmt: skip
        return out

    def experts_grouped(self, x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor | None,
                        w2: torch.Tensor, s2: torch.Tensor | None, ids: torch.Tensor,
                        gates: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """out [N, D] (fp32 or bf16, contiguous) += for each token n, sum_k gates[n, k] * the
        SwiGLU FFN of expert ids[n, k] on x [N, D], in one call that reads each chosen expert
        once: weights as `experts_ffn`'s, ids [N, K] int64, gates [N, K] fp32. Returns out."""
        kind = weight_kind(w1, s1)
        x = _host(x, torch.bfloat16 if kind == BF16 else torch.float32)
        ids, gates = _host(ids, torch.int64), _host(gates, torch.float32)
        self.lib.nanoseek_experts_grouped(
            x.data_ptr(), w1.data_ptr(), None if s1 is None else s1.data_ptr(), w2.data_ptr(),
            None if s2 is None else s2.data_ptr(), ids.data_ptr(), gates.data_ptr(),
            out.data_ptr(), ids.shape[0], ids.shape[1], w1.shape[-1], w2.shape[-1], kind,
            out.dtype == torch.bfloat16,
        )  # fmt: skip
        return out

    def route(self, router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`router(x)[:2]` (nanoseek/model/router.py, the reference) in one call for x [N, D]:
        gate weights [N, K] fp32 and expert ids [N, K] int64, ids in descending order of the
        choice. x and the gate's weight each fp32 or bf16 (contiguous). The logits are summed in
        another order than PyTorch's, so gates may differ in the last bits and a near-tie
        (choices within ~1e-7) may go the other way."""
        w, bias = router.weight, router.e_score_correction_bias
        n, k = x.numel() // x.shape[-1], router.top_k
        x = _host(x)
        gates = torch.empty((n, k), dtype=torch.float32)
        ids = torch.empty((n, k), dtype=torch.int64)
        self.lib.nanoseek_route(
            x.data_ptr(), w.data_ptr(), bias.data_ptr(), gates.data_ptr(), ids.data_ptr(), n,
            x.shape[-1], *route_config(router), x.dtype == torch.bfloat16,
            w.dtype == torch.bfloat16,
        )  # fmt: skip
        return gates, ids

    def combine(self, h: torch.Tensor, gates: list[float], out: torch.Tensor) -> torch.Tensor:
        """out [O] (fp32 or bf16, contiguous) += sum_g gates[g] * h[g] for h fp32 [G, O], g in
        order, fp32 inside; returns out."""
        h = _host(h)
        c_gates = (ctypes.c_float * len(gates))(*gates)
        self.lib.nanoseek_combine(h.data_ptr(), c_gates, out.data_ptr(), h.shape[0], h.shape[1],
                                  out.dtype == torch.bfloat16)  # fmt: skip
        return out

    @staticmethod
    def mla_args(mats: list, norms: tuple) -> tuple:
        """The pointer arguments `mla_decode` takes, made once per set of weights. mats: five
        (weight rows, scales or None) pairs (the first projection, q_b or (None, None), W_UK
        [H,C,N], W_UV [H,V,C], o_proj), int8, bf16 or fp32; norms: (q_a norm weight or None, eps,
        kv_a norm weight, eps). The tensors are kept with the pointers."""
        w = (ctypes.c_void_p * 5)(*[None if m is None else m.data_ptr() for m, _ in mats])
        s = (ctypes.c_void_p * 5)(*[None if sc is None else sc.data_ptr() for _, sc in mats])
        q_norm, eps_q, kv_norm, eps_kv = norms
        ptrs = (w, s, None if q_norm is None else q_norm.data_ptr(), kv_norm.data_ptr(), eps_q,
                eps_kv)  # fmt: skip
        return ptrs, (mats, norms)

    def mla_decode(
        self,
        x: torch.Tensor,
        args: tuple,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache_row: int,
        row_stride: int,
        start: list[int],
        scale: float,
        dims: tuple,
        kind: int,
    ) -> torch.Tensor:
        """T new tokens in each of B rows of MLA in one call (mla.c `nanoseek_mla_decode`;
        nanoseek/model/mla.py `MLA.decode` is the reference): x [B, T, D] (fp32 or bf16, the
        model's dtype) -> out of x's shape, and row b's latents written at positions
        start[b]..start[b]+T-1 of its cache row, at address `cache_row` + b * `row_stride`
        elements ([S_max, C+R], x's dtype). args: `mla_args` of the weights, of `kind` (BF16,
        Q8 or F32: bf16 and fp32 rows of x's dtype); cos, sin [B, T, 1, R/2] fp32; dims: (D,
        QL or 0, H, N, R, C, V)."""
        x, cos, sin = _host(x), _host(cos), _host(sin)
        out = torch.empty_like(x)
        B, T = x.shape[0], x.shape[1]
        self.lib.nanoseek_mla_decode(
            x.data_ptr(), *args[0], cos.data_ptr(), sin.data_ptr(), cache_row, row_stride,
            (ctypes.c_int * B)(*start), scale, out.data_ptr(), B, T, *dims, kind,
            x.dtype == torch.bfloat16,
        )  # fmt: skip
        return out

    def layer_decode(self, x: torch.Tensor, plan: LayerPlan, cos: torch.Tensor, sin: torch.Tensor,
                     cache_row: int, row_stride: int, start: list[int],
                     last_only: bool = False) -> torch.Tensor:  # fmt: skip
        """A decoder layer for T new tokens in each of B rows in one call (layer.c
        `nanoseek_layer_decode`; nanoseek/model/block.py `DecoderLayer.decode` is the
        reference): x [B, T, D] of the model's dtype -> the layer's output ([B, 1, D], each
        row's last token, with `last_only`), the rows' latents written as `mla_decode` writes
        them. plan: the layer's `LayerPlan`."""
        x, cos, sin = _host(x), _host(cos), _host(sin)
        out = torch.empty_like(x)
        B, T = x.shape[0], x.shape[1]
        self.lib.nanoseek_layer_decode(ctypes.byref(plan), x.data_ptr(), out.data_ptr(),
                                       cos.data_ptr(), sin.data_ptr(), cache_row, row_stride,
                                       (ctypes.c_int * B)(*start), B, T, last_only)  # fmt: skip
        return out.view(B * T, -1)[:B].view(B, 1, -1) if last_only and T > 1 else out
