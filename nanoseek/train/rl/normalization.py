"""Loss normalisations: per-token losses [B,T] of one micro-batch -> one scalar.

How the tokens of a batch are weighted is an algorithmic choice, not a detail:

- "token": sum over every token of the batch / its token count [DAPO §3.3, token-level policy
  gradient loss; TRL's default]: every token weighs the same, so long completions weigh by their
  length.
- "sequence": mean over the tokens of each completion, then over completions: the paper's
  1/G sum_i 1/|o_i| sum_t [DeepSeekMath eq. 3; R1 eq. 1]. A token of a short completion weighs
  more; Dr. GRPO shows this favours short right answers and long wrong ones (a length bias).
- "constant": sum over tokens / (completions sampled x max_completion_length) [Dr. GRPO, Liu et
  al. 2025 §3.1; TRL's loss_type="dr_grpo"]: a constant per step, so no per-response length
  term and no dependence on which completions the filters dropped.

A step's batch is trained in micro-batches; `Trainer.train_step` weights each micro-batch's
loss by its share of the step's target tokens (n_mb / n_tokens). A normaliser therefore returns
the micro-batch's share of the batch loss times n_tokens / n_mb ("loop units"), so that the
weighted micro-batch losses add up to the batch loss. With `counts` None the micro-batch is the
whole batch and the value is the batch loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanoseek.train.rl.registry import Registry


@dataclass(frozen=True)
class BatchCounts:
    """Normalisers of the whole step's batch (one micro-batch sees only its own rows)."""

    n_tokens: float  # completion tokens that take loss
    n_seqs: float  # completions that take loss (after the filters)
    n_rollouts: float  # completions the step set out to sample: P x G (before the filters)
    max_len: int  # max_completion_length


Normaliser = Callable[[torch.Tensor, torch.Tensor, "BatchCounts | None"], torch.Tensor]
NORMS: Registry[Normaliser] = Registry("loss normalisation")


@NORMS.add("token")
def token_mean(per_token: torch.Tensor, mask: torch.Tensor, counts: BatchCounts | None):
    # share = sum / n_tokens; times n_tokens / n_mb: the micro-batch's own token mean
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@NORMS.add("sequence")
def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, counts: BatchCounts | None):
    mask = mask.to(per_token.dtype)
    lengths = mask.sum(1)  # [B]
    row_means = (per_token * mask).sum(1) / lengths.clamp(min=1)
    if counts is None:
        return row_means.sum() / (lengths > 0).sum().clamp(min=1)
    share = row_means.sum() / torch.tensor(float(counts.n_seqs)).clamp(min=1)
    return share * counts.n_tokens / mask.sum().clamp(min=1)


@NORMS.add("constant")
def constant(per_token: torch.Tensor, mask: torch.Tensor, counts: BatchCounts | None):
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if counts is None:
        return total / (per_token.shape[0] * per_token.shape[1])
    share = total / (counts.n_rollouts * counts.max_len)
    return share * counts.n_tokens / mask.sum().clamp(min=1)


def normalise(
    name: str, per_token: torch.Tensor, mask: torch.Tensor, counts: BatchCounts | None = None
) -> torch.Tensor:
    """The named normalisation of per_token over mask, in loop units (see above)."""
    return NORMS.get(name)(per_token, mask, counts)
