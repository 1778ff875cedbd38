"""GRPO's objective as pure tensor functions [R1 §2.2.1; DeepSeekMath §4.1]; no model, no I/O.

Shape legend: B completions (P prompts x G generations, grouped: rows g*G .. g*G+G-1 answer
prompt g), T completion positions, V vocabulary.

For prompt q the old policy samples G completions with rewards r_1..r_G; each token t of
completion i gets the same advantage A_i, and the policy maximises

    mean over tokens  min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps_high) A_i) - beta KL_it

with rho_it = pi_theta / pi_old per token and KL_it the k3 estimator of KL(pi_theta || pi_ref).
We minimise the negative. Notes on the choices, all as TRL makes them today:
- advantages: (r - group mean) / (group std + 1e-4), std with Bessel's correction (torch's
  default); `scale="batch"` divides by the std of the whole batch instead, `"none"` not at all
  (Dr. GRPO: dividing by the group std up-weights groups that are nearly all right or wrong).
- with one update per batch (num_iterations 1) pi_old is pi_theta detached: rho = 1 in value,
  yet its gradient is grad log pi, so the loss value is ~ -mean(A) ~ 0 while training works
  (users' most common "bug report").
- normalisation: "token" sums token losses over the whole batch and divides by its token count
  (DAPO; long completions weigh by their length), "sequence" averages tokens within a completion
  first, then completions (the paper's 1/G sum_i 1/|o_i| sum_t: short completions weigh more).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALES = ("group", "batch", "none")
NORMS = ("token", "sequence")
STD_EPS = 1e-4  # TRL's: keeps a near-zero group std from blowing the advantages up


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = STD_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rewards [B] (B = groups x group_size, grouped rows) -> (advantages [B], group std [B/G],
    zero_std [B/G] bool: every completion of the prompt scored the same, so no signal)."""
    if scale not in SCALES:
        raise ValueError(f"advantage scale must be one of {SCALES}, got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # [B/G,G]
    std = r.std(dim=1) if group_size > 1 else torch.zeros(r.shape[0])  # [B/G]
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (std[:, None] + eps)
    elif scale == "batch":
        batch_std = r.std() if r.numel() > 1 else r.new_zeros(())
        adv = adv / (batch_std + eps)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return adv.reshape(-1), std, zero_std


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) [Schulman 2020; R1 eq. 2]:
    pi_ref/pi - log(pi_ref/pi) - 1, evaluated at tokens sampled from pi. Always >= 0 (x - log x
    - 1 >= 0 for x > 0), exactly 0 where the two log-probs agree, unbiased in expectation."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature)[target]: logits [B,T,V], targets [B,T] -> [B,T] fp32.
    The temperature is the rollouts' (TRL and the engine's `token_logprobs` do the same): the
    ratio compares the distributions the tokens were actually sampled from."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    picked = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: [B,T,V] -> [B,T] fp32 (nats)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class GRPOLoss:
    loss: torch.Tensor  # scalar, minimised; normalised as `reduce_tokens` says
    ratio: torch.Tensor  # [B,T] rho (detached)
    kl: torch.Tensor | None  # [B,T] k3 per token (detached); None when beta == 0
    clipped_low: torch.Tensor  # [B,T] bool: rho < 1 - eps with A < 0 (the min picks the clip)
    clipped_high: torch.Tensor  # [B,T] bool: rho > 1 + eps_high with A > 0


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    norm: str = "token",
    n_tokens: float | None = None,
    n_seqs: float | None = None,
) -> GRPOLoss:
    """The clipped-surrogate loss with the k3 penalty. logp/old_logp/ref_logp/mask [B,T]
    (mask 1 on completion tokens that count), advantages [B].

    n_tokens / n_seqs: the normalisers of the *whole* batch when this is one micro-batch of it
    (default: this batch's own counts), so micro-batch losses add up to the batch loss.
    """
    if norm not in NORMS:
        raise ValueError(f"loss normalisation must be one of {NORMS}, got {norm!r}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    A = advantages[:, None].to(logp.dtype)  # [B,1]
    ratio = torch.exp(logp - old_logp)  # [B,T]
    clipped = ratio.clamp(1 - epsilon, 1 + eps_high)
    # where the clipped term is the smaller one its gradient is 0: the update stops there
    per_token = -torch.min(ratio * A, clipped * A)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    loss = reduce_tokens(per_token, mask, norm, n_tokens, n_seqs)
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (A < 0)
        high = (ratio > 1 + eps_high) & (A > 0)
    return GRPOLoss(loss, ratio.detach(), None if kl is None else kl.detach(), low, high)


def reduce_tokens(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    norm: str = "token",
    n_tokens: float | None = None,
    n_seqs: float | None = None,
) -> torch.Tensor:
    """[B,T] per-token values -> scalar: "token" = sum / n_tokens (default: mask.sum()),
    "sequence" = sum over rows of the row's token mean / n_seqs (default: rows with a token)."""
    mask = mask.to(per_token.dtype)
    if norm == "token":
        denom = mask.sum() if n_tokens is None else torch.tensor(float(n_tokens))
        return (per_token * mask).sum() / denom.clamp(min=1)
    if norm == "sequence":
        lengths = mask.sum(1)  # [B]
        row_means = (per_token * mask).sum(1) / lengths.clamp(min=1)
        denom = (lengths > 0).sum() if n_seqs is None else torch.tensor(float(n_seqs))
        return row_means.sum() / denom.clamp(min=1)
    raise ValueError(f"loss normalisation must be one of {NORMS}, got {norm!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over mask (0.0 when the mask is empty), as a Python float for metrics."""
    m = mask.to(torch.float32)
    return float((x.float() * m).sum() / m.sum().clamp(min=1))
