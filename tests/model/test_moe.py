"""Grouped (sorted + grouped GEMM) expert dispatch against the per-expert loop reference."""

import pytest
import torch

from nanoseek.model.moe import MoE, RoutedExperts, expert_rows, max_violation
from tests.helpers import tiny_config


def _experts(E=8, D=64, F=32, dtype=torch.float32):
    torch.manual_seed(0)
    ex = RoutedExperts(E, D, F).to(dtype)
    torch.nn.init.normal_(ex.gate_up_proj, 0, 0.2)
    torch.nn.init.normal_(ex.down_proj, 0, 0.2)
    return ex


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_matches_looped_forward_and_backward(dtype, tol):
    ex = _experts(dtype=dtype)
    N, K = 50, 3
    x = torch.randn(N, 64, dtype=dtype, requires_grad=True)
    idx = torch.stack([torch.randperm(8)[:K] for _ in range(N)])
    idx[idx == 5] = 6  # expert 5 gets no token at all
    w = torch.rand(N, K)
    outs, grads = [], []
    for impl in ("grouped", "looped"):
        ex.zero_grad()
        x.grad = None
        y = ex(x, idx, w, impl=impl)
        y.backward(torch.ones_like(y))
        outs.append(y.detach().float())
        grads.append([x.grad.float(), ex.gate_up_proj.grad.float(), ex.down_proj.grad.float()])
    assert torch.allclose(outs[0], outs[1], atol=tol, rtol=tol)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=tol, rtol=tol)
    assert grads[0][1][5].abs().sum() == 0  # the idle expert gets no gradient


def test_grouped_runs_in_autocast_dtype_like_the_looped_reference():
    """Under bf16 autocast with fp32 weights the grouped GEMMs run in bf16 (autocast does not
    know _grouped_mm), as the looped reference's F.linear does: same output and gradients up
    to bf16 rounding, and far from the all-fp32 result the grouped path used to give."""
    ex = _experts()
    N, K = 64, 3
    x = torch.randn(N, 64, requires_grad=True)
    idx = torch.stack([torch.randperm(8)[:K] for _ in range(N)])
    w = torch.rand(N, K)
    outs, grads = {}, {}
    for impl in ("grouped", "looped"):
        ex.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ex(x, idx, w, impl=impl)
        assert y.dtype == torch.float32  # the K outputs are summed in the residual's dtype
        y.backward(torch.ones_like(y))
        outs[impl] = y.detach()
        grads[impl] = [x.grad.clone(), ex.gate_up_proj.grad.clone(), ex.down_proj.grad.clone()]
    exact = ex(x, idx, w, impl="grouped").detach()  # fp32 throughout
    bf16_err = (outs["grouped"] - exact).abs().max()
    assert bf16_err > 1e-3  # bf16 GEMMs, not fp32 ones
    assert (outs["grouped"] - outs["looped"]).abs().max() < 0.25 * bf16_err
    for a, b in zip(grads["grouped"], grads["looped"]):
        assert torch.allclose(a, b, atol=3e-2, rtol=3e-2)
        assert a.dtype == torch.float32  # master weights keep fp32 gradients


def test_grouped_fallback_for_odd_sizes():
    # D=30 in fp32 is 120 bytes per row: not a multiple of 16, so the split-loop fallback runs
    ex = _experts(E=4, D=30, F=7)
    x = torch.randn(20, 30)
    idx = torch.randint(0, 4, (20, 2))
    w = torch.rand(20, 2)
    assert torch.allclose(ex(x, idx, w, "grouped"), ex(x, idx, w, "looped"), atol=1e-5)


def _wide_moe(cfg) -> MoE:
    """An MoE layer with weights wider than the default init (routing bugs show)."""
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    return moe


def test_moe_layer_shared_plus_routed_and_load_counts():
    cfg = tiny_config()
    moe = _wide_moe(cfg)
    x = torch.randn(2, 10, cfg.hidden_size)
    y, aux = moe.eval()(x)
    assert aux is None  # the balance loss is a training-time term
    w, i, _ = moe.gate(x.view(-1, cfg.hidden_size))
    routed = moe.experts(x.view(-1, cfg.hidden_size), i, w, impl="looped").view_as(x)
    assert torch.allclose(y, routed + moe.shared_experts(x), atol=1e-5)

    moe.train()
    moe.count_load = True
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False  # padding is not counted
    moe(x, mask)
    moe(x, mask)  # counters accumulate over micro-batches
    assert moe.expert_load.dtype == torch.int64
    assert moe.expert_load.sum().item() == 2 * 17 * cfg.num_experts_per_tok


def test_sequence_balance_loss_formula():
    cfg = tiny_config(aux_loss_alpha=0.01)
    moe = MoE(cfg).train()
    B, T, E, K = 2, 6, cfg.n_routed_experts, cfg.num_experts_per_tok
    torch.manual_seed(1)
    scores = torch.rand(B, T, E)
    idx = torch.stack([torch.stack([torch.randperm(E)[:K] for _ in range(T)]) for _ in range(B)])
    loss = moe.sequence_balance_loss(scores, idx)
    expected = 0.0
    for b in range(B):  # [V3 eqs. 17-20], one sequence at a time
        f = torch.zeros(E)
        for t in range(T):
            for e in idx[b, t]:
                f[e] += E / (K * T)
        P = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        expected += 0.01 * (f * P).sum() / B
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_masked_sequence_balance_loss_counts_real_tokens_only():
    """Padding changes nothing: a padded sequence's loss equals the unpadded one's, computed by
    hand over its real tokens (T_real in f_i's denominator and in P_i's mean)."""
    cfg = tiny_config(aux_loss_alpha=0.01)
    moe = MoE(cfg).train()
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    torch.manual_seed(2)
    real, T = 4, 7  # 4 real tokens, 3 of padding
    scores = torch.rand(1, T, E)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])[None]
    mask = torch.tensor([[True] * real + [False] * (T - real)])
    f = torch.zeros(E)
    for t in range(real):
        for e in idx[0, t]:
            f[e] += E / (K * real)
    P = (scores[0, :real] / scores[0, :real].sum(-1, keepdim=True)).mean(0)
    expected = 0.01 * (f * P).sum()
    assert moe.sequence_balance_loss(scores, idx, mask).item() == pytest.approx(expected.item(),
                                                                                  rel=1e-6)  # fmt: skip
    unpadded = moe.sequence_balance_loss(scores[:, :real], idx[:, :real])
    assert unpadded.item() == pytest.approx(expected.item(), rel=1e-6)


def test_max_violation():
    assert max_violation(torch.tensor([10, 10, 10, 10])) == 0.0
    assert max_violation(torch.tensor([20, 10, 5, 5])) == pytest.approx(1.0)
    assert max_violation(torch.zeros(4)) == 0.0


def test_batch_wise_aux_loss_when_not_seq_aux():
    cfg = tiny_config(aux_loss_alpha=0.01, seq_aux=False)
    moe = MoE(cfg).train()
    torch.manual_seed(0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(3, 5, cfg.hidden_size)
    _, aux = moe(x)
    _, idx, s = moe.gate(x.view(-1, cfg.hidden_size))
    expected = moe.sequence_balance_loss(s.view(1, 15, -1), idx.view(1, 15, -1))
    assert aux.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("granule", [1, 4, 16])
def test_expert_rows_layout(granule):
    N, K, E = 37, 3, 8
    torch.manual_seed(0)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    idx[idx == 2] = 3  # an expert without tokens
    src, offs, pos, slot, inv = expert_rows(idx, E, granule)
    M = N * K
    bound = M if granule == 1 else -(-(M + E * (granule - 1)) // granule) * granule
    assert src.shape == (bound,) and offs.dtype == torch.int32
    assert offs[-1] == bound  # the layout's size depends on the shapes only
    starts = [0, *offs[:-1].tolist()]
    for e in range(E):
        s, t = starts[e], int(offs[e])
        assert (t - s) % granule == 0
        rows = src[s:t]
        real = rows != N  # padding rows read the zero row N
        tok, _ = torch.where(idx == e)
        assert torch.equal(rows[real], tok)  # the tokens of expert e, in order
    # pos is src's inverse: token n's K rows, ascending (expert order); slot names the column
    # of idx each one came from; inv names, for each row, its entry of pos (M: padding)
    assert pos.shape == slot.shape == (N, K) and (pos.diff(dim=1) > 0).all()
    assert torch.equal(src[pos], torch.arange(N)[:, None].expand(N, K))
    assert torch.equal(idx.gather(1, slot), torch.searchsorted(offs, pos, right=True))
    assert torch.equal(pos.reshape(-1)[inv[src != N]], torch.nonzero(src != N).squeeze(1))
    assert (inv[src == N] == M).all()


@pytest.mark.parametrize("granule", [1, 16])
@pytest.mark.parametrize("k", [2, 3])
def test_dispatch_and_combine_match_index_select_and_index_add(granule, k):
    """The MoE's row gather and combine (gathers forward and backward) against index_select /
    a weighted index_add_ (autograd's scatter backwards): the same outputs and gradients, for
    K = 2 the same bits."""
    from nanoseek.model.moe import combine_rows, dispatch_rows

    N, E, D = 23, 6, 8
    g = torch.Generator().manual_seed(k)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    layout = expert_rows(idx, E, granule)
    src, pos, slot = layout.src, layout.pos, layout.slot
    x = torch.randn(N + (granule > 1), D, generator=g)
    up = torch.randn(src.shape[0], D, generator=g)  # the gradient arriving at the rows
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    rows_a, rows_b = dispatch_rows(a, layout), b.index_select(0, src)
    assert torch.equal(rows_a, rows_b)
    (rows_a * up).sum().backward()
    (rows_b * up).sum().backward()
    # the padding row (granule > 1) is F.pad's: its gradient is dropped, so only tokens compare
    torch.testing.assert_close(
        a.grad[:N], b.grad[:N], rtol=0 if k == 2 else 1e-6, atol=0 if k == 2 else 1e-6
    )

    out = torch.randn(src.shape[0], D, generator=g).bfloat16()  # the experts' outputs
    gate = torch.rand(N, k, generator=g)
    oa, ob = out.clone().requires_grad_(), out.clone().requires_grad_()
    ga, gb = gate.clone().requires_grad_(), gate.clone().requires_grad_()
    w_rows = torch.zeros(src.shape[0])  # each row's gate weight, laid out as a scatter would
    w_rows = w_rows.index_put((pos.reshape(-1),), gb.gather(1, slot).reshape(-1))
    y_a = combine_rows(oa, layout, ga, torch.float32)
    y_b = torch.zeros(N + (granule > 1), D).index_add(
        0, src, (ob * w_rows[:, None].bfloat16()).float()
    )[:N]
    dy = torch.randn(N, D, generator=g)
    (y_a * dy).sum().backward()
    (y_b * dy).sum().backward()
    exact = dict(rtol=0, atol=0) if k == 2 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_a, y_b, **exact)
    torch.testing.assert_close(oa.grad, ob.grad, **exact)
    torch.testing.assert_close(ga.grad, gb.grad, **exact)


def test_moe_layer_traces_without_graph_break():
    cfg = tiny_config()
    moe = _wide_moe(cfg).to(torch.bfloat16).train()
    x = torch.randn(2, 10, cfg.hidden_size, dtype=torch.bfloat16)
    compiled = torch.compile(moe, backend="eager", fullgraph=True)  # raises on a graph break
    y, _ = compiled(x)
    assert torch.equal(y, moe(x)[0])
