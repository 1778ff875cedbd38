"""The default algorithm is bit-identical to GRPO as the trainer computed it before the RL core:
the pre-refactor functions are kept here, verbatim in their arithmetic, as the reference."""

import contextlib

import pytest
import torch

from nanoseek import load
from nanoseek.train.grpo import GRPOOptions, fill_logprobs, make_loss_fn
from nanoseek.train.rl.advantages import estimate_advantages
from nanoseek.train.rl.logprobs import token_logprobs
from nanoseek.train.rl.normalization import BatchCounts
from nanoseek.train.rl.objective import rl_objective
from nanoseek.train.rl.policy_loss import k3_kl
from tests.train.test_grpo import _rollout_batch, model_dir, tok_dir  # noqa: F401 - fixtures


# ------------------------------------------------------------------------------ the reference
def legacy_group_advantages(rewards, group_size, scale="group", eps=1e-4):
    r = rewards.float().view(-1, group_size)
    std = r.std(dim=1) if group_size > 1 else torch.zeros(r.shape[0])
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (std[:, None] + eps)
    elif scale == "batch":
        batch_std = r.std() if r.numel() > 1 else r.new_zeros(())
        adv = adv / (batch_std + eps)
    return adv.reshape(-1), std, torch.isclose(std, torch.zeros_like(std))


def legacy_reduce_tokens(per_token, mask, norm, n_tokens=None, n_seqs=None):
    mask = mask.to(per_token.dtype)
    if norm == "token":
        denom = mask.sum() if n_tokens is None else torch.tensor(float(n_tokens))
        return (per_token * mask).sum() / denom.clamp(min=1)
    lengths = mask.sum(1)
    row_means = (per_token * mask).sum(1) / lengths.clamp(min=1)
    denom = (lengths > 0).sum() if n_seqs is None else torch.tensor(float(n_seqs))
    return row_means.sum() / denom.clamp(min=1)


def legacy_loss(logp, old, adv, mask, ref, beta, eps, eps_high, norm, n_tokens, n_seqs):
    """grpo_loss as make_loss_fn called it, with make_loss_fn's sequence rescale."""
    eh = eps if eps_high is None else eps_high
    maskf = mask.to(logp.dtype)
    A = adv[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - eps, 1 + eh) * A)
    if beta != 0.0:
        per_token = per_token + beta * k3_kl(logp, ref)
    loss = legacy_reduce_tokens(per_token, maskf, norm, None, n_seqs)
    if norm == "sequence":
        loss = loss * n_tokens / mask.sum().clamp(min=1)
    return loss


# ------------------------------------------------------------------------------ the checks
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_are_bit_identical(scale):
    torch.manual_seed(0)
    r = torch.randint(0, 3, (24,)).float() * 0.37
    r[:4] = 1.0  # one zero-std group
    new = estimate_advantages(r, 4, "group_mean", scale)
    old = legacy_group_advantages(r, 4, scale)
    for x, y in zip((new.values, new.std, new.zero_std), old):
        assert torch.equal(x, y)


@pytest.mark.parametrize("norm", ["token", "sequence"])
@pytest.mark.parametrize("beta,eps_high", [(0.0, None), (0.04, None), (0.0, 0.28)])
def test_micro_batch_losses_and_gradients_are_bit_identical(norm, beta, eps_high):
    torch.manual_seed(1)
    B, T = 12, 9
    old = torch.randn(B, T)
    base = old + 0.3 * torch.randn(B, T)
    ref = old + 0.2 * torch.randn(B, T)
    mask = torch.rand(B, T) > 0.3
    adv = estimate_advantages(torch.randint(0, 2, (B,)).float(), 4).values
    opts = GRPOOptions(loss_norm=norm, beta=beta, epsilon_high=eps_high)
    cfg = opts.rl()
    n_tok, n_seq = float(mask.sum()), float(B)
    counts = BatchCounts(n_tok, n_seq, B, T)
    for s in (slice(0, 5), slice(5, 12)):  # two micro-batches, as the trainer runs them
        a = base[s].clone().requires_grad_(True)
        b = base[s].clone().requires_grad_(True)
        new = rl_objective(cfg, a, old[s], adv[s], mask[s], ref[s], counts).loss
        old_ = legacy_loss(b, old[s], adv[s], mask[s], ref[s], beta, 0.2, eps_high, norm,
                           n_tok, n_seq)  # fmt: skip
        new.backward()
        old_.backward()
        assert torch.equal(new, old_)
        assert torch.equal(a.grad, b.grad)


def test_the_trainers_loss_fn_is_bit_identical(model_dir):  # noqa: F811
    model = load(model_dir).eval()
    (b,) = _rollout_batch(model_dir)
    opts = GRPOOptions(model=model_dir, num_iterations=2, beta=0.05)
    fill_logprobs(model, [b], "old_logp", 1.0, contextlib.nullcontext)
    b["ref_logp"] = b["old_logp"] - 0.1
    with torch.no_grad():  # move the policy off pi_old so the ratios are not all 1
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss, parts = make_loss_fn(opts)(model, b, 0)
    out = model(b["input_ids"], mtp=False, token_mask=b["token_mask"])
    targets = b["labels"][:, 1:]
    mask = targets != -100
    logp = token_logprobs(out.logits[:, :-1], targets.clamp(min=0), 1.0)
    ref = legacy_loss(logp, b["old_logp"], b["advantages"], mask, b["ref_logp"], 0.05, 0.2, None,
                      "token", b["n_tokens"], b["n_seqs"])  # fmt: skip
    assert parts["clip_ratio"] > 0 or parts["kl"] > 0  # the check exercises the terms
    assert torch.equal(loss, ref)
