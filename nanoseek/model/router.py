"""The DeepSeekMoE router (gate) [V3 §2.1.2, eqs. 12-16].

Shape legend: N tokens, D model dim, E routed experts, G groups, K experts per token.

V3 (`noaux_tc`): s = sigmoid(x W^T) in fp32; s' = s + b selects (bias for selection only);
a group scores the sum of its top-2 s'; the best `topk_group` groups stay, the rest are masked to
-inf; the top-K of the masked s' are the experts; their gate weights are the *unbiased* s,
normalised to sum 1 when `norm_topk_prob`, times `routed_scaling_factor`.
V2 (`group_limited_greedy`): softmax scores, a group scores its max, no bias.
V2-Lite (`greedy`): softmax scores, plain top-K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.buffers import FixedDtypeBuffers


class Router(FixedDtypeBuffers):
    # model.to(bfloat16) must not round the bias: b moves in steps of gamma = 1e-3, which bf16
    # cannot resolve near 1 (a known bug in other implementations)
    fixed_dtypes = {"e_score_correction_bias": torch.float32}

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts = c.n_routed_experts
        self.top_k = c.num_experts_per_tok
        self.n_group = c.n_group or 1
        self.topk_group = c.topk_group or self.n_group
        self.scoring_func = c.scoring_func
        self.topk_method = c.topk_method
        self.norm_topk_prob = c.norm_topk_prob
        self.routed_scaling_factor = c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, c.hidden_size))
        # [V3 eq. 16] the balancing bias b_i: updated by the trainer's sign rule (never by the
        # optimizer, so a buffer), and kept in fp32 whatever the model dtype
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32)
        )

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [N,D] -> affinity scores s [N,E] in fp32 [V3 eq. 15]."""
        w = self.weight
        logits = F.linear(x.float(), w if w.dtype == torch.float32 else w.float())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(-1)

    def forward(self, x: torch.Tensor):
        """x [N,D] -> (weights [N,K] fp32, indices [N,K] int64, scores s [N,E] fp32)."""
        s = self.scores(x)
        N = s.shape[0]
        choice = s + self.e_score_correction_bias if self.topk_method == "noaux_tc" else s
        if self.n_group > 1 and self.topk_method != "greedy":
            grouped = choice.view(N, self.n_group, -1)  # [N,G,E/G]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N,G]
            else:
                group_scores = grouped.amax(-1)
            keep = group_scores.topk(
                self.topk_group, dim=-1, sorted=False
            ).indices  # [N,topk_group]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            # masked with -inf, not 0 (HF transformers uses 0): biased scores may be negative
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(N, -1)
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices  # [N,K]
        weights = s.gather(1, indices)  # [V3 eq. 13] unbiased scores
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, s
