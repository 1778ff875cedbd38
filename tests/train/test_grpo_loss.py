"""GRPO's loss math against hand-computed numbers: advantages, k3 KL, clipping, normalisation."""

import math

import pytest
import torch

from nanoseek.train.grpo_loss import (
    group_advantages,
    grpo_loss,
    k3_kl,
    reduce_tokens,
    token_entropy,
    token_logprobs,
)

S = 1 / math.sqrt(2)  # the group-normalised advantage of any 2-completion group with r1 != r2


# ------------------------------------------------------------------------------ advantages
def test_group_advantages_by_hand():
    # group 1: rewards 1, 0 -> mean 0.5, std (Bessel) sqrt(0.5); group 2: 0.2, 0.6 -> mean 0.4
    r = torch.tensor([1.0, 0.0, 0.2, 0.6])
    adv, std, zero = group_advantages(r, 2, "group", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([S, -S, -S, S]))
    torch.testing.assert_close(std, torch.tensor([S, 0.2 * math.sqrt(2)]))
    assert zero.tolist() == [False, False]
    # TRL's eps in the denominator: (r - mean) / (std + 1e-4)
    adv, _, _ = group_advantages(r, 2, "group")
    torch.testing.assert_close(adv[0], torch.tensor(0.5 / (S + 1e-4)))


def test_advantage_scaling_modes():
    r = torch.tensor([1.0, 0.0, 0.2, 0.6])
    none, _, _ = group_advantages(r, 2, "none")
    torch.testing.assert_close(none, torch.tensor([0.5, -0.5, -0.2, 0.2]))
    batch, _, _ = group_advantages(r, 2, "batch", eps=0.0)
    batch_std = r.std()  # one std for the whole batch: 0.4546...
    torch.testing.assert_close(batch, torch.tensor([0.5, -0.5, -0.2, 0.2]) / batch_std)
    # group scaling makes both groups +-1/sqrt(2); batch scaling keeps their relative sizes
    assert abs(batch[0] / batch[2]) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(r, 2, "bogus")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_zero_std_groups_are_flagged_and_get_zero_advantage():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    adv, std, zero = group_advantages(r, 3)
    assert zero.tolist() == [True, True, False]
    assert adv[:6].abs().max() == 0.0 and std[0] == 0.0
    assert adv[6:].abs().min() > 0


# ------------------------------------------------------------------------------ k3 KL
def test_k3_values():
    ln2 = math.log(2)
    logp = torch.zeros(3)
    ref = torch.tensor([ln2, -ln2, 0.0])  # pi_ref / pi = 2, 1/2, 1
    kl = k3_kl(logp, ref)
    torch.testing.assert_close(kl, torch.tensor([2 - ln2 - 1, 0.5 + ln2 - 1, 0.0]))
    x = torch.randn(1000) * 3
    assert (k3_kl(x, torch.randn(1000) * 3) >= 0).all()
    assert k3_kl(x, x).abs().max() == 0.0


def test_k3_is_an_unbiased_estimate_of_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    exact = (p * (p / q).log()).sum()  # KL(p || q): the policy p, the reference q
    x = torch.multinomial(p, 200_000, replacement=True)  # tokens sampled from the policy
    est = k3_kl(p.log()[x], q.log()[x]).mean()
    assert est.item() == pytest.approx(exact.item(), rel=0.02)


# ------------------------------------------------------------------------------ the loss
# 2 groups x 2 completions, 3 completion positions. Ratios chosen so every term is easy by hand.
RATIOS = torch.tensor([[1.0, 1.5, 0.9], [0.5, 1.5, 1.0], [2.0, 1.0, 1.0], [1.0, 0.7, 1.1]])
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
# -min(rho A, clip(rho, 0.8, 1.2) A) per counted token:
#   row 0 (A=+1):   -1,   -min(1.5, 1.2) = -1.2,  -0.9
#   row 1 (A=-1):   -min(-0.5, -0.8) = 0.8,  -min(-1.5, -1.2) = 1.5   (third masked)
#   row 2 (A=+.5):  -min(1.0, 0.6) = -0.6                               (rest masked)
#   row 3 (A=-.5):  0.5,  -min(-0.35, -0.4) = 0.4,  -min(-0.55, -0.55) = 0.55
ROW_SUMS = [-3.1, 2.3, -0.6, 1.45]
ROW_LENS = [3, 2, 1, 3]


def _inputs():
    old = torch.randn(4, 3)
    logp = (old + RATIOS.log()).requires_grad_(True)
    return logp, old


def test_grpo_loss_hand_computed_token_and_sequence():
    logp, old = _inputs()
    out = grpo_loss(logp, old, ADV, MASK, epsilon=0.2)
    assert out.loss.item() == pytest.approx(
        sum(ROW_SUMS) / 9, abs=1e-6
    )  # 0.05 / 9: DAPO's token mean
    seq = grpo_loss(logp, old, ADV, MASK, epsilon=0.2, norm="sequence")
    expect = sum(s / n for s, n in zip(ROW_SUMS, ROW_LENS)) / 4
    assert seq.loss.item() == pytest.approx(expect, abs=1e-6)
    # the clipped tokens: low = rho < 0.8 with A < 0, high = rho > 1.2 with A > 0
    assert out.clipped_low.nonzero().tolist() == [[1, 0], [3, 1]]
    assert out.clipped_high.nonzero().tolist() == [[0, 1], [2, 0]]
    assert out.kl is None


def test_grpo_loss_with_kl_penalty():
    logp, old = _inputs()
    ref = logp.detach() + math.log(2)  # pi_ref / pi = 2 at every token: k3 = 1 - ln 2
    out = grpo_loss(logp, old, ADV, MASK, ref_logp=ref, beta=0.1, epsilon=0.2)
    kl = 2 - math.log(2) - 1
    assert out.loss.item() == pytest.approx(0.05 / 9 + 0.1 * kl, abs=1e-6)
    torch.testing.assert_close(out.kl, torch.full((4, 3), kl))
    with pytest.raises(ValueError, match="reference log-probs"):
        grpo_loss(logp, old, ADV, MASK, beta=0.1)


def test_gradient_is_zero_where_the_clip_is_active():
    logp, old = _inputs()
    grpo_loss(logp, old, ADV, MASK, epsilon=0.2).loss.backward()
    g = logp.grad * 9  # undo the 1/9 token normalisation
    # d(-rho A)/d logp = -rho A where the unclipped term is the minimum, 0 where the clip is
    expect = torch.tensor([[-1.0, 0.0, -0.9], [0.0, 1.5, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.55]])
    torch.testing.assert_close(g, expect)
    # rho = 1.5 with A < 0 (row 1) is NOT clipped: the pessimistic bound keeps pushing it down
    assert g[1, 1] > 0


def test_epsilon_high_widens_the_upper_clip_only():
    logp, old = _inputs()
    out = grpo_loss(logp, old, ADV, MASK, epsilon=0.2, epsilon_high=0.6)
    # row 0 token 1 (rho 1.5 < 1.6) is no longer clipped: -1.5 instead of -1.2; row 2 (rho 2.0)
    # is clipped at 1.6: -0.8 instead of -0.6
    assert out.loss.item() == pytest.approx((0.05 - 0.3 - 0.2) / 9, abs=1e-6)
    assert out.clipped_low.sum() == 2 and out.clipped_high.nonzero().tolist() == [[2, 0]]


def test_ratio_one_gives_minus_mean_advantage_and_policy_gradient():
    # one update per batch: old = logp.detach(), rho == 1, loss == -mean_tokens(A) (~0 in logs)
    logp = torch.randn(4, 3, requires_grad=True)
    out = grpo_loss(logp, logp.detach(), ADV, MASK)
    adv_tokens = (ADV[:, None] * MASK).sum() / MASK.sum()
    assert out.loss.item() == pytest.approx(-adv_tokens.item(), abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -ADV[:, None] * MASK / 9)


def test_micro_batches_add_up_to_the_batch():
    x, m = torch.randn(4, 3), MASK
    whole = reduce_tokens(x, m, "token")
    parts = reduce_tokens(x[:2], m[:2], "token", n_tokens=9) + reduce_tokens(
        x[2:], m[2:], "token", n_tokens=9
    )
    torch.testing.assert_close(whole, parts)
    whole = reduce_tokens(x, m, "sequence")
    parts = reduce_tokens(x[:1], m[:1], "sequence", n_seqs=4) + reduce_tokens(
        x[1:], m[1:], "sequence", n_seqs=4
    )
    torch.testing.assert_close(whole, parts)


def test_token_logprobs_and_entropy():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    for t in (1.0, 0.7):
        ref = torch.log_softmax(logits / t, -1).gather(-1, targets[..., None])[..., 0]
        torch.testing.assert_close(token_logprobs(logits, targets, t), ref)
    uniform = torch.zeros(1, 1, 8)
    assert token_entropy(uniform).item() == pytest.approx(math.log(8))
