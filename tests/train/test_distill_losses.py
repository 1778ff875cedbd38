"""Distillation losses against direct formulas written out with plain loops and Python floats."""

import math

import pytest
import torch

from nanoseek.train.distill_losses import (
    distill_loss,
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
)


def softmax(xs, t=1.0):
    m = max(x / t for x in xs)
    e = [math.exp(x / t - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def jsd(p_t, p_s, beta):
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2  # [B,T,V]
    t = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2
    return s, t


def _direct(fn, s, t):
    """fn(p_t, p_s) applied row by row -> [B,T]."""
    return torch.tensor(
        [[fn(t[b, i].tolist(), s[b, i].tolist()) for i in range(s.shape[1])] for b in range(2)],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("temp", [1.0, 0.5, 2.0])
def test_kls_match_formula(logits, temp):
    s, t = logits
    fwd = _direct(lambda lt, ls: kl(softmax(lt, temp), softmax(ls, temp)), s, t)
    rev = _direct(lambda lt, ls: kl(softmax(ls, temp), softmax(lt, temp)), s, t)
    torch.testing.assert_close(forward_kl(s, t, temp).double(), fwd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reverse_kl(s, t, temp).double(), rev, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fwd, rev)  # the two directions really differ here


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_jsd_matches_formula(logits, beta, temp):
    s, t = logits
    want = _direct(lambda lt, ls: jsd(softmax(lt, temp), softmax(ls, temp), beta), s, t)
    got = generalized_jsd(s, t, beta, temp).double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got <= max(-math.log(beta), -math.log(1 - beta)) + 1e-6).all()  # bounded


def test_jsd_limits(logits):
    s, t = logits
    # the endpoints are defined as the KLs (GKD / TRL convention) ...
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), forward_kl(s, t))
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), reverse_kl(s, t))
    # ... because JSD(beta) / beta -> forward KL and JSD(beta) / (1 - beta) -> reverse KL
    eps = 1e-8  # fp64 logits stay fp64: the cancellation near the ends needs it
    fwd, rev = forward_kl(s, t), reverse_kl(s, t)
    torch.testing.assert_close(generalized_jsd(s, t, eps) / eps, fwd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(generalized_jsd(s, t, 1 - eps) / eps, rev, rtol=1e-4, atol=1e-6)
    # symmetric at beta = 0.5: the classic Jensen-Shannon divergence
    torch.testing.assert_close(generalized_jsd(s, t, 0.5), generalized_jsd(t, s, 0.5))


def test_identical_distributions_and_temperature():
    x = torch.randn(5, 11)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence(kind, x, x.clone()).abs().max() < 1e-6
    s, t = torch.randn(4, 9) * 3, torch.randn(4, 9) * 3
    # a high temperature flattens both distributions: the divergence shrinks towards 0
    assert (forward_kl(s, t, 100.0) < forward_kl(s, t, 1.0)).all()
    assert forward_kl(s, t, 1e4).max() < 1e-5


def test_masked_mean_gradient_and_errors():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    loss = distill_loss("forward_kl", s, t, mask)
    per = forward_kl(s, t)
    torch.testing.assert_close(loss, per[mask].mean())
    loss.backward()
    # d KL(p_T || p_S) / d student logits = (p_S - p_T) / n_valid on valid rows, 0 elsewhere
    want = (torch.softmax(s.detach(), -1) - torch.softmax(t, -1)) / mask.sum()
    torch.testing.assert_close(s.grad, want * mask[..., None])
    with pytest.raises(ValueError, match="share a tokenizer"):
        distill_loss("forward_kl", s, t[..., :5])
    with pytest.raises(ValueError, match="valid: forward_kl, reverse_kl, jsd"):
        distill_loss("kl", s, t)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, 0.0)


def test_bf16_logits_and_minus_inf():
    s = torch.randn(3, 8).bfloat16()
    t = torch.randn(3, 8).bfloat16()
    assert forward_kl(s, t).dtype == torch.float32  # computed in fp32 whatever comes in
    t = t.float()
    t[:, -2:] = float("-inf")  # the teacher rules two ids out; a student that agrees costs 0
    s2 = t.clone()
    assert torch.isfinite(forward_kl(s2, t)).all() and forward_kl(s2, t).abs().max() < 1e-6
    assert torch.isfinite(generalized_jsd(s.float(), t, 0.5)).all()
