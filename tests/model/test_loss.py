"""The chunked cross-entropy (custom autograd Function) against plain F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import loss as L


def _case(dtype, N=70, V=50, seed=0):
    torch.manual_seed(seed)
    logits = (torch.randn(N, V) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[::5] = L.IGNORE_INDEX
    return logits, targets


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 3 rows per chunk: many chunks and a ragged last one
    monkeypatch.setattr(L, "_CHUNK_ELEMENTS", 150)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37])  # 1: gradient written by forward
def test_chunked_matches_plain_cross_entropy(dtype, tol, grad_scale):
    logits, targets = _case(dtype)
    grads, losses = [], []
    for impl in ("chunked", "reference"):
        logits.grad = None
        loss = L.lm_loss(logits, targets, impl=impl)
        (loss * grad_scale).backward()
        losses.append(loss.detach())
        grads.append(logits.grad)
    assert losses[0].dtype == torch.float32
    assert torch.allclose(losses[0], losses[1], atol=tol, rtol=tol)
    assert grads[0].dtype == dtype
    if dtype == torch.bfloat16 and grad_scale != 1:
        # forward wrote the gradient for grad_loss 1; scaling it rounds a second time: within
        # one bf16 step (2^-8 relative) of rounding once
        assert torch.allclose(grads[0].float(), grads[1].float(), atol=1e-8, rtol=2**-7)
    else:
        # rounded to the logits' dtype once, from the same fp32 value up to fp32 rounding:
        # equal in bf16 but for rare ties, within fp32 rounding in fp32
        assert torch.allclose(grads[0].float(), grads[1].float(), atol=1e-8, rtol=1e-5)
        assert (grads[0] != grads[1]).float().mean() < (0.01 if dtype == torch.bfloat16 else 1)
    assert (grads[0][targets == L.IGNORE_INDEX] == 0).all()


def test_without_grad_and_for_extreme_logits():
    logits, targets = _case(torch.float32)
    with torch.no_grad():
        assert torch.allclose(
            L.lm_loss(logits, targets), F.cross_entropy(logits, targets), rtol=1e-6
        )
    # a target 200 below the top logit: its probability underflows fp32, the loss must not
    far = torch.zeros(4, 50)
    far[:, 0] = 200.0
    t = torch.tensor([1, 2, 0, L.IGNORE_INDEX])
    x = far.clone().requires_grad_()
    loss = L.lm_loss(x, t)
    loss.backward()
    assert loss.item() == pytest.approx(F.cross_entropy(far, t).item(), rel=1e-6)
    assert torch.isfinite(x.grad).all()


def test_no_valid_target_gives_nan_like_torch():
    logits, _ = _case(torch.float32, N=6)
    t = torch.full((6,), L.IGNORE_INDEX)
    assert torch.isnan(L.lm_loss(logits, t)) and torch.isnan(F.cross_entropy(logits, t))


def test_compiled_loss_block_routes_lm_loss_and_restores():
    """Inside `compiled_loss(fn)` lm_loss calls fn (the trainers' compiled cross-entropy), with
    the flattened logits and targets; outside it, and after an exception, the chunked path."""
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 0] = L.IGNORE_INDEX
    calls = []

    def spy(lg, t):
        calls.append((tuple(lg.shape), tuple(t.shape)))
        return L.reference_loss(lg, t)

    with L.compiled_loss(spy):
        inside = L.lm_loss(logits, targets)
    assert calls == [((10, 11), (10,))]
    torch.testing.assert_close(inside, L.lm_loss(logits, targets, impl="chunked"))
    with pytest.raises(RuntimeError), L.compiled_loss(spy):
        raise RuntimeError("a failed step")
    L.lm_loss(logits, targets)
    assert len(calls) == 1
