"""fp8_grouped_linear: a drop-in FP8 grouped_linear for the routed experts."""

import pytest
import torch

from nanoseek.fp8 import EmulatedBackend, fp8_grouped_linear, fp8_linear, make_fp8_grouped_linear
from nanoseek.model.moe import RoutedExperts, grouped_linear


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(counts, K=96, N=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), K, generator=g)
    w = torch.randn(len(counts), N, K, generator=g) * 0.1
    dy = torch.randn(int(counts.sum()), N, generator=g)
    return x, w, dy, counts, counts.cumsum(0).to(torch.int32)


def _run(fn, x, w, dy, counts, offs):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(xr, wr, offs)
    y.backward(dy)
    return y.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("counts", [[40, 0, 130, 7, 300], [1, 1, 1]])
def test_matches_plain_grouped_linear(counts):
    args = _inputs(counts)
    fp8 = _run(lambda *a: fp8_grouped_linear(*a, backend="emulated"), *args)
    ref = _run(grouped_linear, *args)
    for a, b in zip(fp8, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) < 0.06
    idle = [e for e, n in enumerate(counts) if n == 0]
    assert all(fp8[2][e].abs().sum() == 0 for e in idle)  # no tokens, no weight gradient


def test_equals_fp8_linear_per_expert():
    """The tiling argument of grouped.py made concrete: expert e's rows through the grouped
    function are bit-identical to fp8_linear on that expert alone (1x128 feature tiles never
    cross rows; Wgrad's token tiles are cut per expert)."""
    x, w, dy, counts, offs = _inputs([70, 200, 0, 130])
    y, dx, dw = _run(lambda *a: fp8_grouped_linear(*a, backend="emulated"), x, w, dy, counts, offs)
    start = 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start : start + n].clone().requires_grad_()
        we = w[e].clone().requires_grad_()
        ye = fp8_linear(xe, we, None, EmulatedBackend())
        ye.backward(dy[start : start + n])
        assert torch.equal(y[start : start + n], ye)
        assert torch.equal(dx[start : start + n], xe.grad)
        assert torch.equal(dw[e], we.grad)
        start += n


def test_drop_in_for_routed_experts(monkeypatch):
    """What RoutedExperts gets once it calls a `linear_fn`: forward and backward through the
    real expert dispatch stay close to the bf16/fp32 path."""
    torch.manual_seed(0)
    ex = RoutedExperts(8, 64, 32)
    torch.nn.init.normal_(ex.gate_up_proj, 0, 0.2)
    torch.nn.init.normal_(ex.down_proj, 0, 0.2)
    x = torch.randn(50, 64)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(50)])
    wts = torch.rand(50, 2)
    outs = []
    for fn in (grouped_linear, make_fp8_grouped_linear("emulated")):
        ex.linear_fn = fn
        ex.zero_grad()
        xr = x.clone().requires_grad_()
        y = ex(xr, idx, wts)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xr.grad, ex.gate_up_proj.grad.clone(), ex.down_proj.grad.clone()))
    # two FP8 GEMMs in a row (gate_up, down), so the errors compound: ~5-7% here
    errs = [_rel(a, b) for a, b in zip(*outs)]
    print("expert rel errors y, dx, d_gate_up, d_down:", errs)
    assert 1e-3 < min(errs) and max(errs) < 0.1  # FP8 did run, and stayed close


def test_autocast_and_bad_counts():
    x, w, dy, counts, offs = _inputs([10, 20])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_grouped_linear(x, w, offs, backend="emulated")
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="counts sum"):
        fp8_grouped_linear(x, w, torch.tensor([10, 15], dtype=torch.int32), backend="emulated")
