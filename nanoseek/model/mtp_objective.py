"""The training objective of DeepSeek-V3: next-token loss plus Multi-Token Prediction.

    L = L_main + lambda / D * sum_{k=1..D} L_MTP^k (+ the balance loss)      [V3 §2.2, eq. 25]

where L_MTP^k is the cross-entropy of MTP module k, whose position i predicts token i + k + 1
[V3 eq. 24]. One implementation, used by `CausalLM.forward(labels=...)` and by every trainer
(pre-training, SFT, distillation): they differ only in where the targets come from and in
lambda (pre-training switches 0.3 -> 0.1 [V3 §4.2]).

Targets are a function `targets(k) -> [B, T-k]` (k = 0: the main loss), so each caller keeps
its own masking: packed pre-training windows mask targets in another document, SFT masks
everything but the assistant's replies. `label_targets` builds it from Hugging Face style
`labels` (the input ids, shifted inside) and is safe at document boundaries when the sequence
packs several documents: a document starts wherever `position_ids` do not continue by one (the
convention of transformers' packed-sequence collator, positions restarting at 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanoseek.model.loss import IGNORE_INDEX, lm_loss

Targets = Callable[[int], torch.Tensor]  # depth k -> targets [B, T-k] (IGNORE_INDEX: no loss)


@dataclass
class Objective:
    loss: torch.Tensor  # what backward() is called on
    main_loss: torch.Tensor
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # depth 1..D
    aux_loss: torch.Tensor | None = None
    mtp_lambda: float = 0.0

    def parts(self) -> dict[str, float]:
        """The terms as floats, named as the trainers log them."""
        out = {"main_loss": self.main_loss.item()}
        out.update({f"mtp_loss_{k}": m.item() for k, m in enumerate(self.mtp_losses, 1)})
        if self.aux_loss is not None:
            out["aux_loss"] = self.aux_loss.item()
        return out


def depth_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """lm_loss, or a zero that keeps the module in the graph when no target is valid (short
    SFT conversations leave deep MTP depths nothing to predict: the mean would be NaN, and
    every data-parallel rank must report the same terms)."""
    if bool((targets != IGNORE_INDEX).any()):
        return lm_loss(logits, targets)
    return logits.sum() * 0


def mtp_objective(
    logits: torch.Tensor,
    mtp_logits: Sequence[torch.Tensor],
    targets: Targets,
    mtp_lambda: float,
    aux_loss: torch.Tensor | None = None,
    depths: int | None = None,
    main_weight: float = 1.0,
) -> Objective:
    """V3 eq. 25 on the main logits [B,T,V] and the MTP logits (depth k: [B,T-k,V]).
    `depths` is D (default: the number of MTP logits given; a model whose sequence was too short
    for its deepest modules still divides by its D). A zero lambda skips the MTP terms.
    `main_weight` scales the main term (distillation weighs its hard-label loss beside the KD
    loss); `main_loss` is reported unscaled."""
    main = lm_loss(logits, targets(0))
    loss, mtp = main if main_weight == 1.0 else main_weight * main, []
    if mtp_logits and mtp_lambda:
        mtp = [depth_loss(lg, targets(k)) for k, lg in enumerate(mtp_logits, start=1)]
        d = depths or len(mtp)
        loss = loss + mtp_lambda / d * torch.stack(mtp).sum()
    if aux_loss is not None:
        loss = loss + aux_loss
    return Objective(loss, main, mtp, aux_loss, mtp_lambda)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [B|1,T] -> document index [B|1,T]: a new document wherever the position
    does not continue the previous one by exactly one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1)


def label_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> Targets:
    """Targets from HF-style labels [B,T] (the input ids, IGNORE_INDEX where no loss is taken):
    depth k, position i -> labels[i + k + 1], IGNORE_INDEX past the end and, with
    `position_ids`, wherever that token lies in another document than position i."""
    docs = None if position_ids is None else document_ids(position_ids).expand_as(labels)

    def targets(k: int) -> torch.Tensor:
        shift = k + 1
        # [B, T-k]: the last position's target lies past the end
        t = F.pad(labels[:, shift:], (0, 1), value=IGNORE_INDEX)
        if docs is not None:
            same = F.pad(docs[:, shift:] == docs[:, : docs.shape[1] - shift], (0, 1))
            t = t.masked_fill(~same, IGNORE_INDEX)
        return t

    return targets
