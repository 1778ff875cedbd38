"""One pre-norm transformer block: x + MLA(norm(x)), then h + FFN(norm(h)), FFN dense or MoE.

The same forward serves training (no cache), prefill and decode (a cache view, see MLA.forward).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.ffn import SwiGLU
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MoE
from nanoseek.model.norm import RMSNorm
from nanoseek.model.weights import MODULE_WEIGHTS


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MLA(config)
        self.mlp = (
            MoE(config)
            if config.is_moe_layer(layer_idx)
            else SwiGLU(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, token_mask=None, cache=None):
        """x [B,T,D] -> (x [B,T,D], balance loss (MoE in training) or None). `cache`: this
        layer's view of a latent cache, whose `weights` also multiply the FFN (inference); a
        decode or verification step goes through `weights.decoder_layer` (`decode`, or one
        fused implementation of it)."""
        if cache is not None and not cache.prefill:
            return cache.weights.decoder_layer(self, x, cache), None
        return self._compose(x, cos, sin, mask, token_mask, cache)

    def decode(self, x, cache):
        """x [B,T,D] -> [B,T,D] for new tokens after cached ones (MLA writes their latents to
        `cache`, a layer's view of a decode step): what `weights.decoder_layer` computes (the
        reference of its fused implementations). A step that wants only each row's last
        position (`cache.step.last_only`: the MTP module catching up on positions whose cache
        entries it needs, V3 §2.2) returns [B,1,D]: the FFN runs on that position alone."""
        st = cache.step
        return self._compose(x, st.cos, st.sin, None, None, cache, st.last_only)[0]

    def _compose(self, x, cos, sin, mask, token_mask, cache, last_only=False):
        weights = MODULE_WEIGHTS if cache is None else cache.weights
        x = x + self.self_attn(weights.norm(self.input_layernorm, x), cos, sin, mask, cache)
        if last_only:
            x = x[:, -1:]
        h = weights.norm(self.post_attention_layernorm, x)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(h, token_mask, weights)
        else:
            y, aux = self.mlp(h, weights), None
        return x + y, aux


def sum_aux(total: torch.Tensor | None, aux: torch.Tensor | None) -> torch.Tensor | None:
    if aux is None:
        return total
    return aux if total is None else total + aux
