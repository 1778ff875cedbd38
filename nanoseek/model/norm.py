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
        # Normalise in fp32 (bf16 sums of squares lose digits), round to x's dtype, then scale:
        # the same order as transformers' DeepseekV3RMSNorm, so bf16 outputs agree bit for bit.
        # F.rms_norm already accumulates bf16 input in fp32 (bit-identical to casting x first),
        # so no fp32 copy of x is made (saves two casts forward and two backward per norm).
        dim = (x.shape[-1],)
        if x.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # inference in fp32: the weight inside the kernel gives the same bits, one kernel
            return F.rms_norm(x, dim, self.weight, self.eps)
        return self.weight * F.rms_norm(x, dim, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
