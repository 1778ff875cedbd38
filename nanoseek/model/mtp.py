"""Multi-Token Prediction modules [V3 §2.2, eqs. 21-25].

Module k (1..D) at position i combines the previous depth's hidden state h^{k-1}_i (the main
model's last hidden state before the final norm for k = 1) with the embedding of token t_{i+k}:
    x = eh_proj(cat(enorm(emb(t_{i+k})), hnorm(h^{k-1}_i)))
embedding first, as the released weights expect (the paper's eq. 21 prints the other order). One
full transformer block follows; its own norm (`shared_head.norm`) and the main model's output
head predict t_{i+k+1}. Embedding and head are shared with the main model; checkpoints store
module k as layer `num_hidden_layers + k - 1` (nanoseek/checkpoint/keys.py maps the names).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import DecoderLayer
from nanoseek.model.norm import RMSNorm
from nanoseek.model.weights import MODULE_WEIGHTS


class SharedHead(nn.Module):
    """Holds the module's final norm; the head itself is the main model's `lm_head`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        d = config.hidden_size
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h_prev, emb_next, cos, sin, mask=None, token_mask=None, cache=None):
        """h_prev [B,T',D] (depth k-1 at positions i), emb_next [B,T',D] (emb of t_{i+k}) ->
        (h [B,T',D] before the norm, balance loss or None). Training and speculative drafting
        (with `cache`, the module's own latent cache) run this same forward."""
        weights = MODULE_WEIGHTS if cache is None else cache.weights
        x = torch.cat((weights.norm(self.enorm, emb_next), weights.norm(self.hnorm, h_prev)), -1)
        (x,) = weights.linear(x, self.eh_proj)  # eq. 21
        return super().forward(x, cos, sin, mask, token_mask, cache)  # eq. 22
