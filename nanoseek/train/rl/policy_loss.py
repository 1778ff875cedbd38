"""Per-token policy losses: the surrogate each completion token contributes, before the tokens are
reduced to one number (normalization.py).

For completion i with advantage A_i and token t, rho_it = pi_theta / pi_old (per token). We
minimise the negative of the objective:

- "clipped": -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), PPO's pessimistic bound as
  GRPO uses it [DeepSeekMath eq. 3; R1 eq. 1]. eps_high = eps_low is the paper's symmetric clip;
  eps_high > eps_low is DAPO's clip-higher [Yu et al. 2025, DAPO §3.1]: a low-probability token
  with A > 0 may grow further before the clip stops it, which keeps entropy from collapsing.
  Where the clipped term is the smaller one its gradient is 0: the update stops there.
- "reinforce": -rho A, no clip: the plain importance-weighted policy gradient (on-policy,
  rho = 1 in value, this is REINFORCE with the advantage as the baselined return).

Plus an optional KL penalty beta * k3(pi_theta, pi_ref) per token [R1 eq. 2; Schulman 2020, "Approximating
KL divergence"]. With one update per batch pi_old is pi_theta detached: rho = 1 in value yet its
gradient is grad log pi, so the loss value is ~ -mean(A) ~ 0 while training works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanoseek.train.rl.registry import Registry

# (ratio [B,T], A [B,1], eps_low, eps_high) -> (per-token loss [B,T], clipped_low, clipped_high)
PolicyLossFn = Callable[
    [torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


@POLICY_LOSSES.add("clipped")
def clipped_surrogate(ratio, A, eps_low: float, eps_high: float):
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * A, clipped * A)
    with torch.no_grad():  # tokens where the clip is the minimum (their gradient is 0)
        low = (ratio < 1 - eps_low) & (A < 0)
        high = (ratio > 1 + eps_high) & (A > 0)
    return per_token, low, high


@POLICY_LOSSES.add("reinforce")
def reinforce(ratio, A, eps_low: float, eps_high: float):
    never = torch.zeros_like(ratio, dtype=torch.bool)
    return -(ratio * A), never, never


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): pi_ref/pi - log(pi_ref/pi) - 1, evaluated at
    tokens sampled from pi. Always >= 0 (x - log x - 1 >= 0 for x > 0), exactly 0 where the two
    log-probs agree, unbiased in expectation."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class TokenLoss:
    per_token: torch.Tensor  # [B,T] loss per token (not yet masked or reduced)
    ratio: torch.Tensor  # [B,T] rho (detached)
    kl: torch.Tensor | None  # [B,T] k3 per token (detached); None when beta == 0
    clipped_low: torch.Tensor  # [B,T] bool: rho < 1 - eps_low with A < 0
    clipped_high: torch.Tensor  # [B,T] bool: rho > 1 + eps_high with A > 0


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    policy_loss: str = "clipped",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
) -> TokenLoss:
    """logp/old_logp/ref_logp [B,T], advantages [B] -> TokenLoss. epsilon_high None: epsilon."""
    fn = POLICY_LOSSES.get(policy_loss)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    A = advantages[:, None].to(logp.dtype)  # [B,1]: every token of a completion shares A_i
    ratio = torch.exp(logp - old_logp)
    per_token, low, high = fn(ratio, A, epsilon, eps_high)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    return TokenLoss(per_token, ratio.detach(), None if kl is None else kl.detach(), low, high)
