"""Weight-only int8 for decoding (opt-in, `Engine(..., quantize="int8")`): a quarter of the bytes.

Shape legend: N rows, K in features, O out features, E experts.

Decoding a few tokens on CPU reads every weight it multiplies once per step, so its speed is the
memory bandwidth divided by the bytes of the weights (bench/decode.py --gemm-split shows GEMMs
taking most of a step). Storing the decode-time copies as int8 with one scale per output
channel (symmetric, absmax / 127) reads 1 byte per weight instead of 4 (fp32) and runs on ATen's
`_weight_int8pack_mm` CPU kernel, which dequantises inside the GEMM. Activations go through it in
bf16 (the kernel's fast input type) and come back in the model dtype.

This changes the numbers: ~0.7% relative error per matmul from the weights, plus bf16 rounding
of the activations, so greedy output is NOT token-identical to the exact path (bench/decode.py
prints the share of identical tokens; tests/infer/test_quant.py bounds the logit error). Prefill,
training and every exact-path test stay in the model dtype; only what `DecodeWeights` would copy
(the projections, the experts, the output head) is quantised, the absorbed attention weights
W_UK / W_UV and the norms are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTIZE = (None, "int8")


@dataclass
class Int8Weight:
    """q [..., O, K] int8 and scale [..., O] (bf16): W ~= q * scale[..., None]."""

    q: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def quantize(cls, w: torch.Tensor, rows: int = 4096) -> Int8Weight:
        """Per-output-channel symmetric int8 of w [..., O, K], `rows` output channels at a time
        (the fp32 temporaries of a [102400, 2048] head would be GBs: streamed loading of a
        model near the memory limit must not peak there)."""
        flat = w.detach().reshape(-1, w.shape[-1])  # [rows of all ..., K]
        q = torch.empty(flat.shape, dtype=torch.int8)
        scale = torch.empty(flat.shape[0], dtype=torch.float32)
        for r in range(0, flat.shape[0], rows):
            part = flat[r : r + rows].float()
            s = part.abs().amax(dim=-1).clamp(min=1e-12) / 127.0  # [rows]
            q[r : r + rows] = torch.round(part / s[:, None]).clamp_(-127, 127)
            scale[r : r + rows] = s
        return cls(q.view(w.shape), scale.view(w.shape[:-1]).to(torch.bfloat16))

    def __getitem__(self, e: int) -> Int8Weight:
        """Expert e of a stacked [E, O, K] weight."""
        return Int8Weight(self.q[e], self.scale[e])

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x @ W^T [..., O] in x's dtype (bf16 in, bf16 out: no casts)."""
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.q, self.scale)  # [N,O]
        y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], -1)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[..., None]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


def mm(x: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    """x @ W^T for a decode weight: a float W^T [K, O] tensor or an `Int8Weight`."""
    if isinstance(w, Int8Weight):
        return w.mm(x)
    if x.dtype == torch.bfloat16 and x.numel() == x.shape[-1] and w.t().is_contiguous():
        # one bf16 row against nn.Linear's [O, K] layout: torch.mv streams the weight up to
        # 1.4x faster than F.linear's GEMM (`python bench/gemv.py --dtype bf16 --shapes big`)
        return torch.mv(w.t(), x.reshape(-1)).view(*x.shape[:-1], -1)
    return x @ w
