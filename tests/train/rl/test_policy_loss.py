"""Per-token policy losses against hand-computed numbers (rl/policy_loss.py)."""

import math

import pytest
import torch

from nanoseek.train.rl.policy_loss import POLICY_LOSSES, k3_kl, token_loss

# one token per completion: rho and A chosen to sit on either side of both clips
RHO = torch.tensor([[1.25], [1.3], [0.75], [0.85]])
A = torch.tensor([1.0, 1.0, -1.0, -1.0])


def _logps():
    old = torch.tensor([[-1.0], [-2.0], [-0.5], [-3.0]])
    return (old + RHO.log()).requires_grad_(True), old


def _loss(**kw):
    logp, old = _logps()
    t = token_loss(logp, old, A, **kw)
    t.per_token.sum().backward()
    return t, logp.grad


def test_symmetric_clip():
    # eps 0.2: clip range [0.8, 1.2]. -min(rho A, clip(rho) A):
    #   1.25, A=+1: -min(1.25, 1.2) = -1.2 (clipped high)   1.3, A=+1: -1.2 (clipped high)
    #   0.75, A=-1: -min(-0.75, -0.8) = 0.8 (clipped low)   0.85, A=-1: 0.85 (inside)
    t, grad = _loss(epsilon=0.2)
    torch.testing.assert_close(t.per_token[:, 0], torch.tensor([-1.2, -1.2, 0.8, 0.85]))
    assert t.clipped_high[:, 0].tolist() == [True, True, False, False]
    assert t.clipped_low[:, 0].tolist() == [False, False, True, False]
    # d(-rho A)/d log pi = -rho A where the unclipped term is the min, 0 where the clip is
    torch.testing.assert_close(grad[:, 0], torch.tensor([0.0, 0.0, 0.0, 0.85]))


def test_dapo_clip_higher():
    # eps_low 0.2, eps_high 0.28: range [0.8, 1.28]; 1.25 is now inside (-1.25, gradient -1.25),
    # 1.3 clips at 1.28; the low side is unchanged
    t, grad = _loss(epsilon=0.2, epsilon_high=0.28)
    torch.testing.assert_close(t.per_token[:, 0], torch.tensor([-1.25, -1.28, 0.8, 0.85]))
    assert t.clipped_high[:, 0].tolist() == [False, True, False, False]
    torch.testing.assert_close(grad[:, 0], torch.tensor([-1.25, 0.0, 0.0, 0.85]))


def test_reinforce_never_clips():
    t, grad = _loss(policy_loss="reinforce")
    torch.testing.assert_close(t.per_token[:, 0], torch.tensor([-1.25, -1.3, 0.75, 0.85]))
    torch.testing.assert_close(grad[:, 0], torch.tensor([-1.25, -1.3, 0.75, 0.85]))
    assert not t.clipped_low.any() and not t.clipped_high.any()


def test_k3_penalty_is_added_per_token():
    logp, old = _logps()
    ref = logp.detach() - math.log(2)  # pi_ref / pi = 1/2: k3 = 1/2 + ln 2 - 1 = 0.1931...
    t = token_loss(logp, old, A, epsilon=0.2, ref_logp=ref, beta=0.5)
    kl = 0.5 + math.log(2) - 1
    torch.testing.assert_close(t.kl[:, 0], torch.full((4,), kl))
    torch.testing.assert_close(t.per_token[:, 0], torch.tensor([-1.2, -1.2, 0.8, 0.85]) + 0.5 * kl)
    assert k3_kl(logp, logp).abs().max() == 0.0
    with pytest.raises(ValueError, match="reference log-probs"):
        token_loss(logp, old, A, beta=0.5)


def test_a_new_policy_loss_is_one_register_call():
    def sign_only(ratio, adv, lo, hi):  # a toy surrogate: -sign(A) rho
        never = torch.zeros_like(ratio, dtype=torch.bool)
        return -(ratio * adv.sign()), never, never

    POLICY_LOSSES.register("test_sign", sign_only, overwrite=True)
    t, _ = _loss(policy_loss="test_sign")
    torch.testing.assert_close(t.per_token[:, 0], torch.tensor([-1.25, -1.3, 0.75, 0.85]))
    with pytest.raises(ValueError, match="already registered"):
        POLICY_LOSSES.register("clipped", sign_only)
    with pytest.raises(ValueError, match="unknown policy loss 'nope'; valid: .*clipped"):
        token_loss(*_logps(), A, policy_loss="nope")
