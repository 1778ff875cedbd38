"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases [V3 §2.1.2]."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.weights import MODULE_WEIGHTS


class SwiGLU(nn.Module):
    """Dense FFN of the first layers, and the shared experts of MoE layers."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, weights=MODULE_WEIGHTS) -> torch.Tensor:
        """x [...,D] -> [...,D]; `weights` multiplies (nanoseek/model/weights.py)."""
        return weights.swiglu(x, self.gate_proj, self.up_proj, self.down_proj)
