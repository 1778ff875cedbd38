"""RMSNorm with fp32 statistics, as DeepSeek and Hugging Face compute it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 sums of squares lose digits), cast back, then scale: the same
        # order as transformers' DeepseekV3RMSNorm, so bf16 outputs agree bit for bit.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
