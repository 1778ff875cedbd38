"""The DeepSeek-V3 causal language model: embedding, blocks, final norm, head, MTP modules.

Module names follow the Hugging Face checkpoint keys (`model.embed_tokens`, `model.layers.L.*`,
`model.norm`, `lm_head`), so state dicts map one to one except for the routed experts (3D here,
per-expert on disk) and the MTP modules (`mtp.k` here, `model.layers.{L+k}` on disk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import DecoderLayer, sum_aux
from nanoseek.model.mla import ATTN_IMPLS, MLA
from nanoseek.model.moe import EXPERT_IMPLS, MoE, RoutedExperts
from nanoseek.model.mtp import MTPLayer
from nanoseek.model.mtp_objective import label_targets, mtp_objective
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding, yarn_inv_freq
from nanoseek.model.router import Router
from nanoseek.model.weights import MODULE_WEIGHTS


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B,T,V]
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B,T-k,V]
    hidden_states: torch.Tensor | None = None  # [B,T,D] last block's output, before the norm
    loss: torch.Tensor | None = None  # main + lambda/D * sum(mtp) + balance
    main_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None  # sequence-wise balance loss, all MoE layers


class Backbone(nn.Module):
    """`model.*` in HF terms: embedding, decoder layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, cos, sin, token_mask=None, cache=None):
        """input_ids [B,T] -> (h [B,T,D] the last block's output before the norm, the summed
        balance loss or None). `cache` (inference): a step over a latent cache whose
        `layer(i)` is layer i's view (nanoseek/infer/cache.py)."""
        h, aux = self.embed_tokens(input_ids), None  # [B,T,D]
        for i, layer in enumerate(self.layers):
            h, a = layer(h, cos, sin, None, token_mask, None if cache is None else cache.layer(i))
            aux = sum_aux(aux, a)
        return h, aux


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        L = config.num_hidden_layers
        self.mtp = nn.ModuleList(
            MTPLayer(config, L + k) for k in range(config.num_nextn_predict_layers)
        )
        self.rotary = RotaryEmbedding(config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, std) for every matrix (V3 §4.2 uses 0.006), ones for norms, zero bias."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, RoutedExperts):
                nn.init.normal_(m.gate_up_proj, 0.0, std)
                nn.init.normal_(m.down_proj, 0.0, std)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, 0.0, std)
                m.e_score_correction_bias.zero_()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after `to_empty` from the meta device)."""
        self.rotary.inv_freq.copy_(yarn_inv_freq(self.config)[0])
        for moe in self.moe_layers():
            moe.expert_load.zero_()
            moe.gate.e_score_correction_bias.zero_()

    def set_impl(self, attn: str | None = None, experts: str | None = None) -> CausalLM:
        """Switch the attention core (sdpa | eager | absorbed) or the expert dispatch
        (grouped | looped) everywhere; the slow ones are the references the tests compare to."""
        if attn is not None and attn not in ATTN_IMPLS:
            raise ValueError(f"attn must be one of {ATTN_IMPLS}, got {attn!r}")
        if experts is not None and experts not in EXPERT_IMPLS:
            raise ValueError(f"experts must be one of {EXPERT_IMPLS}, got {experts!r}")
        for m in self.modules():
            if attn is not None and isinstance(m, MLA):
                m.attn_impl = attn
            if experts is not None and isinstance(m, MoE):
                m.experts_impl = experts
        return self

    def moe_layers(self) -> list[MoE]:
        """Every MoE, main layers first, then the MTP modules' (bias updates cover all)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    # the embedding, not the head: a model streamed into int8 decode weights keeps its
    # projections and head on the meta device (nanoseek/infer/streamed.py), never its embedding
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ forward
    def rope(self, positions: torch.Tensor):
        """positions [B|1,T] -> cos, sin [B|1,T,1,R/2] (fp32), broadcast over heads."""
        cos, sin = self.rotary(positions)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    def logits(self, h, weights=MODULE_WEIGHTS, norm: RMSNorm | None = None) -> torch.Tensor:
        """Hidden states [...,D] -> logits [...,V]: the final norm (or an MTP module's `norm`)
        and the output head, which the MTP modules share [V3 §2.2]."""
        norm = self.model.norm if norm is None else norm
        return weights.linear(weights.norm(norm, h), self.lm_head)[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        mtp: bool = True,
    ) -> CausalLMOutput:
        """input_ids [B,T] -> logits [B,T,V] (+ MTP logits, + losses when labels are given).

        labels [B,T] are the input ids themselves (shifted inside, HF convention), with
        IGNORE_INDEX where no loss is taken. token_mask [B,T] marks real (non-padding) tokens
        for the router statistics. `mtp=False` skips the MTP modules (inference).
        """
        B, T = input_ids.shape
        packed = position_ids  # given positions may restart per document (packed sequences)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]
        cos, sin = self.rope(position_ids)
        h, aux = self.model(input_ids, cos, sin, token_mask)
        out = CausalLMOutput(logits=self.logits(h), hidden_states=h)

        if mtp:
            emb = self.model.embed_tokens(input_ids)  # [B,T,D]
            h_k = h
            for k, layer in enumerate(self.mtp, start=1):
                if T - k <= 0:
                    break
                # position i (< T-k) sees h^{k-1}_i and the embedding of t_{i+k} [V3 eq. 21]
                tm = None if token_mask is None else token_mask[:, : T - k]
                h_k, a = layer(
                    h_k[:, : T - k], emb[:, k:], cos[:, : T - k], sin[:, : T - k], None, tm
                )
                aux = sum_aux(aux, a)
                out.mtp_logits.append(self.logits(h_k, norm=layer.shared_head.norm))

        out.aux_loss = aux
        if labels is not None:  # V3 eq. 25, safe at document boundaries given position_ids
            obj = mtp_objective(out.logits, out.mtp_logits, label_targets(labels, packed),
                                self.config.mtp_loss_weight, aux, depths=len(self.mtp))  # fmt: skip
            out.main_loss, out.mtp_losses, out.loss = obj.main_loss, obj.mtp_losses, obj.loss
        return out
