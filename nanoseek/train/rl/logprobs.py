"""Token log-probabilities and entropies of a policy's logits, and a masked mean for metrics."""

from __future__ import annotations

import torch


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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over mask (0.0 when the mask is empty), as a Python float for metrics."""
    m = mask.to(torch.float32)
    return float((x.float() * m).sum() / m.sum().clamp(min=1))
