"""Logit-level distillation losses: forward KL, reverse KL and the generalised JSD of GKD.

Shape legend: N token positions (any leading shape works), V vocabulary. p_T is the teacher's
next-token distribution, p_S the student's, both softmax(logits / temperature), computed in fp32.

    forward KL   KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)   mode-covering: the student
                 spreads mass over everything the teacher allows (classic KD, Hinton et al.)
    reverse KL   KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)   mode-seeking: the student
                 puts mass where the teacher is confident (MiniLLM)
    JSD(beta)    beta * KL(p_T || M) + (1 - beta) * KL(p_S || M),  M = beta p_T + (1-beta) p_S
                 [GKD, Agarwal et al. 2024]; bounded, unlike either KL.

Limits (tested): as beta -> 0, JSD(beta) / beta -> forward KL; as beta -> 1,
JSD(beta) / (1 - beta) -> reverse KL. JSD itself goes to 0 at both ends, so - as GKD and TRL's
`generalized_jsd_loss` do - beta = 0 and beta = 1 exactly are *defined* as forward and reverse
KL. Footgun: the loss scale therefore jumps at the ends; pick learning rates per beta.

Temperature divides both logit sets (softens both distributions). The losses are not multiplied
by temperature^2 (Hinton's gradient-scale correction); with `ce_weight` mixing in hard-label
cross-entropy at temperature > 1, raise the KD weight yourself if you want that balance.
"""

from __future__ import annotations

import math

import torch

LOSSES = ("forward_kl", "reverse_kl", "jsd")


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[...,V] logits -> log-softmax(logits / temperature) in fp32 (fp64 stays fp64)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def kl_from_log_probs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position: [...,V] log-probs -> [...]; terms with p = 0 count 0 (even
    where q = 0 too, e.g. both logits -inf)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_T || p_S) per position, [...]."""
    return kl_from_log_probs(
        log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    )


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_S || p_T) per position, [...]."""
    return kl_from_log_probs(
        log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    )


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """JSD(beta) per position, [...] (module docstring; beta = 0 / 1 are forward / reverse KL)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    logp_s = log_probs(student_logits, temperature)
    logp_t = log_probs(teacher_logits, temperature)
    if beta == 0.0:
        return kl_from_log_probs(logp_t, logp_s)
    if beta == 1.0:
        return kl_from_log_probs(logp_s, logp_t)
    # log M = logsumexp(log beta + log p_T, log(1-beta) + log p_S): no exp/log round trip
    log_m = torch.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))
    return beta * kl_from_log_probs(logp_t, log_m) + (1 - beta) * kl_from_log_probs(logp_s, log_m)


def divergence(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence `kind` (one of LOSSES), [...]."""
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits, temperature)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature)
    if kind == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature)
    raise ValueError(f"unknown distillation loss {kind!r}; valid: {', '.join(LOSSES)}")


def distill_loss(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean divergence over the positions where `mask` [...] is True (token-level mean, like
    `lm_loss`). logits [...,V] of the same shape: slice a larger vocabulary away first."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; do the models share a tokenizer?"
        )
    if mask is not None:  # select first: the divergence is then computed on valid rows only
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    d = divergence(kind, student_logits, teacher_logits, beta=beta, temperature=temperature)
    return d.mean()
