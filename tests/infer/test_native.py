"""The native decode kernels against PyTorch: every GEMV tile and tail, batched matrices, the
int32 chunking of the int8 kernel, RMSNorm, the router, the dispatch around them, and the
fallbacks where they cannot be built."""

import pytest
import torch

from nanoseek.infer import native, quant
from nanoseek.infer.quant import Int8Weight
from nanoseek.infer.weights import FEW_TOKENS, DecodeWeights
from nanoseek.model.ffn import SwiGLU
from nanoseek.model.norm import RMSNorm
from nanoseek.model.router import Router
from nanoseek.model.weights import (
    MODULE_WEIGHTS,
    combine,
    experts_ffn,
    grouped_experts_ffn,
    swiglu,
)
from tests.helpers import tiny_config

KERNELS = native.kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=f"native kernels: {native.reason()}")


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("n_out", [4, 7, 64])  # 7: a tail of 3 rows after a block of 4
def test_bf16_matches_fp32_reference(m, n_out):
    g = torch.Generator().manual_seed(m * 100 + n_out)
    x = torch.randn(m, 96, generator=g).bfloat16()
    w = torch.randn(n_out, 96, generator=g).bfloat16()
    want = x.float() @ w.float().T  # the same bf16 inputs, exact products, fp32 sums
    fp32 = KERNELS.bf16(x, w, out_dtype=torch.float32)
    assert fp32.shape == (m, n_out) and fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, want, rtol=1e-5, atol=1e-4)
    out = KERNELS.bf16(x, w)  # bf16 out: round to nearest even, as .bfloat16() does
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fp32.bfloat16())


@needs_kernels
def test_bf16_batched_heads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 128, generator=g).bfloat16()  # [G,M,K]
    w = torch.randn(16, 33, 128, generator=g).bfloat16()  # [G,O,K]
    want = torch.bmm(x.float(), w.float().transpose(1, 2))
    torch.testing.assert_close(KERNELS.bf16(x, w, torch.float32), want, rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("n_out", [4, 7, 64])
def test_f32_matches_fp32_reference(m, n_out):
    """fp32 rows (an fp32 model's own weights): PyTorch's result to fp32 summation order, for a
    few rows, several matrices (heads) and chosen experts; K = 48: three vectors of 16."""
    g = torch.Generator().manual_seed(m * 100 + n_out)
    x, w = torch.randn(m, 48, generator=g), torch.randn(n_out, 48, generator=g)
    torch.testing.assert_close(KERNELS.f32(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    heads_x, heads_w = torch.randn(5, m, 48, generator=g), torch.randn(5, n_out, 48, generator=g)
    torch.testing.assert_close(KERNELS.f32(heads_x, heads_w),
                               torch.bmm(heads_x, heads_w.transpose(1, 2)), rtol=1e-5, atol=1e-5)  # fmt: skip
    ids = [4, 0, 4]
    rows = torch.randn(len(ids), 48, generator=g)
    want = torch.stack([heads_w[e] @ rows[i] for i, e in enumerate(ids)])
    torch.testing.assert_close(KERNELS.f32(rows, heads_w, ids=ids), want, rtol=1e-5, atol=1e-5)
    assert KERNELS.f32(x, w, torch.bfloat16).dtype == torch.bfloat16


@needs_kernels
@pytest.mark.parametrize("m", [1, 2, 4, 6])
def test_int8_as_exact_as_its_weights(m):
    """Against the dequantised weights in fp32: activations as int16 per row leave ~1e-4 of
    relative error even with an outlier channel 30x the rest (ATen's bf16 activations: ~2e-3)."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=g)
    x[:, 7] *= 30
    q = Int8Weight.quantize(torch.randn(37, 256, generator=g))
    want = x @ q.dequantize().T
    got = KERNELS.q8(x, q.q, q.scale, torch.float32)
    assert got.shape == (m, 37)
    assert rel(got, want) < 5e-4
    assert rel(KERNELS.q8(x, q.q, q.scale, torch.bfloat16), want) < 5e-3  # + bf16 output


@needs_kernels
def test_int8_long_rows_do_not_overflow():
    """K past one int32 chunk (4096), every product at its largest and of one sign: the exact
    sum needs more than 31 bits, which the chunked accumulation must not wrap."""
    k = 4096 * 2 + 64
    q = Int8Weight(torch.full((5, k), 127, dtype=torch.int8), torch.ones(5, dtype=torch.bfloat16))
    x = torch.full((1, k), 3.0)
    got = KERNELS.q8(x, q.q, q.scale, torch.float32)
    torch.testing.assert_close(got, torch.full((1, 5), 3.0 * 127 * k), rtol=1e-6, atol=0)


@needs_kernels
def test_int8_batched_and_zero_rows():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 24, 64, generator=g)
    q = Int8Weight.quantize(w)
    x = torch.randn(4, 2, 64, generator=g)
    x[1, 0] = 0  # an all-zero row: scale 0, output 0, no NaN
    want = torch.bmm(x, q.dequantize().transpose(1, 2))
    got = q.bmm(x)
    assert rel(got, want) < 5e-4 and (got[1, 0] == 0).all()


@needs_kernels
@pytest.mark.parametrize("kind", ["f32", "bf16", "q8"])
def test_a_rows_bits_do_not_depend_on_the_rows_beside_it(kind):
    """A few activation rows stream the weights row after row, more take 4 x 4 tiles (gemv.c
    `block_*`): both add a product's terms in the same order, so each row's result is the same
    bits alone, in a verify step's 2-4 rows, or among 12. K = 4256: past the row-wise limit of
    the activations' bytes from 2 fp32 rows and 4 int16 / bf16 rows on, two int32 chunks of
    the int8 kernel, tails of its 4-vector unroll; 13 outputs: a tail of 1 after 3 blocks of
    4."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(12, 4256, generator=g), torch.randn(13, 4256, generator=g)
    if kind == "q8":
        q = Int8Weight.quantize(w)

        def run(rows):
            return KERNELS.q8(rows, q.q, q.scale, torch.float32)
    else:
        dtype = torch.float32 if kind == "f32" else torch.bfloat16
        x, w = x.to(dtype), w.to(dtype)

        def run(rows):
            return getattr(KERNELS, kind)(rows, w, out_dtype=torch.float32)

    every = run(x)
    for lo, hi in [(0, 1), (5, 6), (0, 2), (3, 6), (0, 3), (4, 8), (0, 9), (2, 12)]:
        assert torch.equal(run(x[lo:hi]), every[lo:hi]), (lo, hi)


@needs_kernels
def test_leading_dims_and_strided_activations():
    """x [B,T,K] against one matrix, and per-head x given as a transposed view ([G,M,K] from
    [M,G,K], as MLA's absorbed attention passes it): the same numbers as contiguous 2D calls."""
    g = torch.Generator().manual_seed(4)
    q = Int8Weight.quantize(torch.randn(24, 64, generator=g))
    x = torch.randn(2, 3, 64, generator=g)
    want = KERNELS.q8(x.reshape(6, 64), q.q, q.scale, torch.float32).reshape(2, 3, 24)
    assert torch.equal(KERNELS.q8(x, q.q, q.scale, torch.float32), want)
    heads = Int8Weight.quantize(torch.randn(4, 16, 64, generator=g))
    xh = torch.randn(3, 4, 64, generator=g).transpose(0, 1)  # [G=4, M=3, K], not contiguous
    want = torch.bmm(xh, heads.dequantize().transpose(1, 2))
    assert rel(KERNELS.q8(xh, heads.q, heads.scale, torch.float32), want) < 5e-4
    wb = torch.randn(4, 16, 64, generator=g).bfloat16()
    got = KERNELS.bf16(xh.bfloat16(), wb, torch.float32)
    torch.testing.assert_close(got, torch.bmm(xh.bfloat16().float(), wb.float().transpose(1, 2)),
                               rtol=1e-5, atol=1e-4)  # fmt: skip


def test_dispatch_agrees_with_aten(monkeypatch):
    """quant.mm / bmm give the same numbers (to each path's rounding) with and without the
    native kernels, for every case that reaches them."""
    g = torch.Generator().manual_seed(2)
    q = Int8Weight.quantize(torch.randn(48, 64, generator=g))
    x32 = torch.randn(3, 64, generator=g)
    wb = torch.randn(40, 64, generator=g).bfloat16()
    xb = torch.randn(2, 64, generator=g).bfloat16()
    heads = Int8Weight.quantize(torch.randn(4, 16, 64, generator=g))
    xh = torch.randn(4, 2, 64, generator=g)

    def run():
        return (quant.mm(x32, q), quant.mm(xb, wb.t()), quant.mm(xb[0], wb.t()),
                quant.bmm(xh, heads))  # fmt: skip

    with_native = run()
    monkeypatch.setattr(native, "kernels", lambda: None)
    aten = run()
    for a, b in zip(with_native, aten):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel(a, b.float()) < 1e-2


@needs_kernels
def test_other_output_dtypes_are_converted():
    """The kernels write fp32 or bf16; fp16 activations get their output in fp16, not bytes of
    another dtype in an fp16 buffer."""
    q = Int8Weight.quantize(torch.randn(12, 64))
    x = torch.randn(2, 64).half()
    y = q.mm(x)
    assert y.dtype == torch.float16
    assert rel(y, x.float() @ q.dequantize().T) < 2e-3


def test_only_cpu_tensors_reach_the_kernels():
    """They take host pointers: any other device keeps PyTorch's kernels."""
    assert native.kernels_for(torch.empty(2, device="meta")) is None
    assert native.kernels_for(torch.empty(2)) is native.kernels()


def test_disabled_or_unbuildable_means_none(monkeypatch):
    try:
        native.kernels.cache_clear()
        monkeypatch.setenv(native.ENV, "0")
        assert native.kernels() is None and native.reason() == f"{native.ENV}=0"
        native.kernels.cache_clear()
        monkeypatch.delenv(native.ENV)
        monkeypatch.setenv("CC", "false")  # a compiler that always fails
        if native.platform.machine().lower() in ("x86_64", "amd64"):
            assert native.kernels() is None and "could not build" in native.reason()
    finally:
        native.kernels.cache_clear()
        monkeypatch.undo()
        native.kernels()  # the real kernels again for the tests after this one


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "bf16"])
@pytest.mark.parametrize("shared_input", [True, False])
def test_experts_mm_runs_the_chosen_experts(kind, shared_input):
    """DecodeWeights.experts_mm (one native call) against the modules' loop over experts, with
    an expert chosen twice and the input shared (gate/up) or one row per expert (down)."""
    g = torch.Generator().manual_seed(3)
    param = torch.randn(8, 40, 64, generator=g)  # [E,O,K]
    ids = [5, 1, 5, 7]
    x = torch.randn(64 if shared_input else (len(ids), 64), generator=g)
    if kind == "int8":
        weights = DecodeWeights(transpose=False, quantize="int8")
        exact = Int8Weight.quantize(param).dequantize()
    else:
        param, x = param.bfloat16(), x.bfloat16()
        weights, exact = DecodeWeights(transpose=False), param.float()
    got = weights.experts_mm(x, param, ids)
    want = MODULE_WEIGHTS.experts_mm(x.float(), exact, ids)
    assert got.shape == (len(ids), 40) and got.dtype == x.dtype
    assert rel(got, want) < (5e-4 if kind == "int8" else 5e-3)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 2, 40), (5, 17), (1100, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_the_module(shape, dtype):
    """One native call against nanoseek's RMSNorm: tails of a 16-wide vector (40, 17), rows
    split over threads (1100 x 256), a non-contiguous input. fp32 to the last bit or two (the
    sum of squares in another order); bf16 within one rounding of it."""
    g = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g) * 0.3 + 1)
    x = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3).to(dtype)[..., ::2]
    with torch.inference_mode():
        want, got = norm(x), KERNELS.rmsnorm(x, norm.weight, norm.eps)
    assert got.shape == x.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # x * rstd can land on the other side of a bf16 rounding boundary
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)
        assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("kind", ["exact", "fp32", "int8", "bf16"])
def test_decode_norms(kind):
    """DecodeWeights.norm: the module itself in exact fp32 engines (bit-identical), the native
    kernel elsewhere where it runs, to the module's numbers."""
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    norm = RMSNorm(64).to(dtype)
    x = torch.randn(2, 1, 64).to(dtype)
    weights = DecodeWeights(transpose=False, quantize="int8" if kind == "int8" else None,
                            exact=kind == "exact")  # fmt: skip
    with torch.inference_mode():
        want, got = norm(x), weights.norm(norm, x)
    if kind == "exact" or KERNELS is None:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2**-7 if kind == "bf16" else 1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["exact", "fp32", "int8", "bf16"])
def test_experts_weighted_sum(kind):
    """experts_mm with gates adds the gate-weighted sum of the chosen experts to `out` in expert
    order: in exact fp32 engines the modules' sum of the same products (bit for bit), in int8 /
    bf16 engines one native call, to their rounding."""
    g = torch.Generator().manual_seed(5)
    param = torch.randn(8, 48, 64, generator=g)  # [E,O,K]
    ids, gates = [6, 2, 6], [0.7, -1.3, 0.25]
    x = torch.randn(len(ids), 64, generator=g)
    out0 = torch.randn(48, generator=g)
    if kind == "int8":
        weights = DecodeWeights(transpose=False, quantize="int8")
        exact = Int8Weight.quantize(param).dequantize()
    elif kind == "bf16":
        param, x, out0 = param.bfloat16(), x.bfloat16(), out0.bfloat16()
        weights, exact = DecodeWeights(transpose=False), param.float()
    else:  # exact: W^T copies through PyTorch; fp32: the native kernel on the rows
        weights = DecodeWeights(transpose=kind == "exact", exact=kind == "exact")
        exact = param
    out = out0.clone()
    got = weights.experts_mm(x, param, ids, gates, out)
    assert got is out and out.dtype == out0.dtype
    want = MODULE_WEIGHTS.experts_mm(x.float(), exact, ids, gates, out0.float().clone())
    if kind == "exact":  # the per-expert products, then the modules' sum: the same bits
        assert torch.equal(out, combine(weights.experts_mm(x, param, ids), gates, out0.clone()))
        assert rel(out, want) < 1e-6
    elif kind == "fp32":  # the same maths, summed in another order
        assert rel(out, want) < 1e-6
    else:
        assert rel(out, want) < (5e-4 if kind == "int8" else 1e-2)


# fmt: off
ROUTERS = {  # [V3 §2.1.2] / [V2 §2.1.2] routers; wide rows go over both threads
    "v3": dict(n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4),
    "v3_wide": dict(n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                    hidden_size=4096),
    "v2": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_routed_experts=16,
               n_group=4, topk_group=2, num_experts_per_tok=3),
    "v2_lite": dict(scoring_func="softmax", topk_method="greedy", n_routed_experts=16,
                    n_group=1, topk_group=1, num_experts_per_tok=4, norm_topk_prob=False),
}
# fmt: on


@needs_kernels
@pytest.mark.parametrize("case", ROUTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_the_router(case, dtype):
    """One native call against Router.forward: the same experts for every token (in another
    order), gates equal to fp32 rounding; a biased choice that differs from the scores' (the
    bias must steer the choice, not the gates)."""
    cfg = tiny_config(**ROUTERS[case])
    g = torch.Generator().manual_seed(len(case))
    router = Router(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.5, generator=g)
        router.e_score_correction_bias.normal_(0, 0.3, generator=g)
    router = router.to(dtype)
    x = torch.randn(9, cfg.hidden_size, generator=g).to(dtype)
    with torch.inference_mode():
        want_gates, want_ids, scores = router(x)
        gates, ids = KERNELS.route(router, x)
    assert gates.dtype == torch.float32 and ids.dtype == torch.int64
    assert gates.shape == ids.shape == want_ids.shape
    want_sorted, want_order = want_ids.sort(-1)
    got_sorted, got_order = ids.sort(-1)
    assert torch.equal(got_sorted, want_sorted)
    torch.testing.assert_close(gates.gather(1, got_order), want_gates.gather(1, want_order),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    if cfg.topk_method == "noaux_tc":  # the top-K of the unbiased scores differs somewhere
        plain = scores.topk(cfg.num_experts_per_tok, -1).indices.sort(-1).values
        assert not torch.equal(plain, got_sorted)


@pytest.mark.parametrize("kind", ["exact", "fp32", "int8", "bf16"])
def test_decode_route(kind):
    """DecodeWeights.route: the module itself in exact fp32 engines (bit-identical), the native
    router elsewhere where it runs, choosing the same experts."""
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    router = Router(tiny_config(**ROUTERS["v3"])).to(dtype)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(2, router.weight.shape[1]).to(dtype)
    weights = DecodeWeights(transpose=False, quantize="int8" if kind == "int8" else None,
                            exact=kind == "exact")  # fmt: skip
    with torch.inference_mode():
        (want_gates, want_ids, _), (gates, ids) = router(x), weights.route(router, x)
    if kind == "exact" or KERNELS is None:
        assert torch.equal(gates, want_gates) and torch.equal(ids, want_ids)
    else:
        assert torch.equal(ids.sort(-1).values, want_ids.sort(-1).values)


@pytest.mark.parametrize("kind", ["exact", "fp32", "int8", "bf16"])
@pytest.mark.parametrize("width", [96, 40])  # 40: not a multiple of 32, the composed path
def test_experts_ffn(kind, width):
    """experts_ffn: one token through its experts' SwiGLU FFNs, the gate-weighted sum added to
    out. Exact fp32 engines compose experts_mm (bit for bit the modules' sequence); int8 and
    bf16 engines make one native call, equal to that composition through the same weights to
    int8's activation rounding, and for bf16 at least as close to fp32 arithmetic on the same
    bf16 weights (its gate/up products are not rounded to bf16 before silu). Gate values span
    -30..30, the ends of silu's range."""
    g = torch.Generator().manual_seed(width)
    E, D, F = 8, 64, width
    gate_up = torch.randn(E, 2 * F, D, generator=g) * 1.2
    down = torch.randn(E, D, F, generator=g) * 0.2
    ids, gates = [5, 1, 7, 1], [0.5, -0.25, 1.5, 0.125]
    x = torch.randn(D, generator=g)
    out0 = torch.randn(D, generator=g)
    if kind == "bf16":
        gate_up, down, x, out0 = gate_up.bfloat16(), down.bfloat16(), x.bfloat16(), out0.bfloat16()
    weights = DecodeWeights(transpose=kind == "exact", quantize="int8" if kind == "int8" else None,
                            exact=kind == "exact")  # fmt: skip
    with torch.inference_mode():
        out = out0.clone()
        got = weights.experts_ffn(x, gate_up, down, ids, gates, out)
        composed = experts_ffn(weights, x, gate_up, down, ids, gates, out0.clone())
        exact = MODULE_WEIGHTS.experts_ffn(x.float(), gate_up.float(), down.float(), ids, gates,
                                           out0.float().clone())  # fmt: skip
        h = torch.einsum("d,kod->ko", x.float(), gate_up.float()[ids])
        assert h[:, :F].abs().max() > 15  # silu's input reaches far into both tails
    assert got is out and out.dtype == out0.dtype
    if kind == "exact" or KERNELS is None or (width % 32 and kind != "fp32"):
        assert torch.equal(got, composed)
    elif kind == "fp32":  # one native call (widths in multiples of 16) or its products
        assert rel(got, exact) < 1e-6
    elif kind == "int8":
        assert rel(got, composed.float()) < 1e-5
        assert rel(got, exact) < 2e-2  # the weights' int8
    else:
        assert rel(got, exact) <= rel(composed, exact) + 1e-3
        assert rel(got, exact) < 1e-2


@pytest.mark.parametrize("kind", ["exact", "fp32", "int8", "bf16"])
@pytest.mark.parametrize("n", [3, FEW_TOKENS, FEW_TOKENS + 1])  # the last: composed but in fp32
def test_grouped_experts_ffn(kind, n, monkeypatch):
    """grouped_experts_ffn: a few tokens through their chosen experts, each chosen expert once
    for all its tokens (several tokens share experts here). Exact fp32 engines and more tokens
    than the native calls take (FEW_TOKENS; fp32 native.F32_ROWS) compose (bit for bit the
    modules' sequence); int8, bf16 and fp32 engines make
    one native call, equal to the composition through the same weights to int8's activation
    rounding, and for bf16 at least as close to fp32 arithmetic on the same bf16 weights."""
    g = torch.Generator().manual_seed(n)
    E, D, F, K = 8, 64, 96, 3
    gate_up = torch.randn(E, 2 * F, D, generator=g) * 1.2
    down = torch.randn(E, D, F, generator=g) * 0.2
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])  # [N,K] distinct
    gates = torch.rand(n, K, generator=g)
    x, out0 = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    if kind == "bf16":
        gate_up, down, x, out0 = gate_up.bfloat16(), down.bfloat16(), x.bfloat16(), out0.bfloat16()
    weights = DecodeWeights(transpose=kind == "exact", quantize="int8" if kind == "int8" else None,
                            exact=kind == "exact")  # fmt: skip
    calls, real = [], native.Kernels.experts_grouped
    monkeypatch.setattr(native.Kernels, "experts_grouped",
                        lambda self, *a: calls.append(1) or real(self, *a))  # fmt: skip
    with torch.inference_mode():
        out = out0.clone()
        got = weights.grouped_experts_ffn(x, gate_up, down, ids, gates, out)
        native_ran = calls == [1]
        composed = grouped_experts_ffn(weights, x, gate_up, down, ids, gates, out0.clone())
        exact = MODULE_WEIGHTS.grouped_experts_ffn(x.float(), gate_up.float(), down.float(), ids,
                                                   gates, out0.float().clone())  # fmt: skip
    assert got is out and out.dtype == out0.dtype
    if (
        kind == "exact"
        or KERNELS is None
        or n > (native.F32_ROWS if kind == "fp32" else FEW_TOKENS)
    ):
        assert not native_ran and torch.equal(got, composed)
    elif kind == "fp32":
        assert native_ran and rel(got, exact) < 1e-6
    elif kind == "int8":
        assert native_ran and rel(got, composed.float()) < 1e-5
        assert rel(got, exact) < 2e-2  # the weights' int8
    else:
        assert native_ran and rel(got, exact) <= rel(composed, exact) + 1e-3
        assert rel(got, exact) < 1e-2


@pytest.mark.parametrize("kind", ["exact", "fp32", "int8", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, FEW_TOKENS + 1])  # the last: composed but in fp32
def test_swiglu(kind, rows):
    """DecodeWeights.swiglu (the dense FFN and shared experts): for up to FEW_TOKENS tokens in
    int8 / bf16 engines (fp32: native.F32_ROWS) one native call over the fused gate/up weight,
    equal to the composition through the same weights to int8's activation rounding (bf16: at
    least as close to fp32 arithmetic on the same weights); exact fp32 engines and more tokens
    compose, bit for bit."""
    torch.manual_seed(rows)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    ffn = SwiGLU(64, 96).to(dtype)
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(rows, 1, 64).to(dtype)
    weights = DecodeWeights(transpose=kind == "exact", quantize="int8" if kind == "int8" else None,
                            exact=kind == "exact")  # fmt: skip
    with torch.inference_mode():
        got = ffn(x, weights)
        composed = swiglu(weights, x, ffn.gate_proj, ffn.up_proj, ffn.down_proj)
        exact = swiglu(MODULE_WEIGHTS, x.float(), *(m.float() for m in (
            ffn.gate_proj, ffn.up_proj, ffn.down_proj)))  # fmt: skip
    assert got.shape == x.shape and got.dtype == dtype
    if (
        kind == "exact"
        or KERNELS is None
        or rows > (native.F32_ROWS if kind == "fp32" else FEW_TOKENS)
    ):
        assert torch.equal(got, composed)
    elif kind == "fp32":
        assert rel(got, exact) < 1e-6
    elif kind == "int8":
        assert rel(got, composed.float()) < 1e-5
    else:
        assert rel(got, exact) <= rel(composed, exact) + 1e-3
