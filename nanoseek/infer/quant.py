"""Weight-only int8 for decoding (opt-in, `Engine(..., quantize="int8")`): a quarter of the bytes.

Shape legend: N rows, K in features, O out features, E experts, G matrices (heads).

Decoding a few tokens on CPU reads every weight it multiplies once per step, so its speed is the
memory bandwidth divided by the bytes of the weights (bench/decode.py --gemm-split shows GEMMs
taking most of a step). Storing the decode-time copies as int8 with one scale per output
channel (symmetric, absmax / 127) reads 1 byte per weight instead of 4 (fp32). Up to
`NATIVE_ROWS` (64) rows go through nanoseek's own kernel (nanoseek/infer/native.py: activations
as int16 with one scale per row, so the weights' rounding is the only one that matters, and
1.4-1.6x the bandwidth of ATen's kernel for one row); more rows, or a CPU without the kernel,
run on ATen's `_weight_int8pack_mm`, which dequantises inside the GEMM and takes the activations
in bf16. Outputs come back in the activations' dtype.

This changes the numbers: ~0.7% relative error per matmul from the weights (plus bf16 rounding of
the activations on ATen's path), so greedy output is NOT token-identical to the exact path
(bench/decode.py prints the share of identical tokens; tests/infer/test_quant.py bounds the logit
error). Prefill, training and every exact-path test stay in the model dtype; only what
`DecodeWeights` would copy (the projections, the experts, the output head and, with the native
kernel, MLA's absorbed W_UK / W_UV) is quantised; the norms and the router are not.

`mm` and `bmm` are the decode weights' multiplications; they also send one or two bf16 rows
against nn.Linear's [O, K] layout to the native bf16 kernel (`torch.mv` without it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.infer import native

QUANTIZE = (None, "int8")
# activation rows `Int8Weight.mm` sends to the native kernel (more go to ATen): its int8 products
# are compute-bound from ~4 rows but ~2x ATen's `_weight_int8pack_mm` at 4-64 rows (a short
# prompt's prefill; `python bench/gemv.py --dtype int8 --shapes big --rows 27`)
NATIVE_ROWS = 64


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
        """x [..., K] -> x @ W^T [..., O] in x's dtype."""
        rows = x.numel() // x.shape[-1]
        if rows <= NATIVE_ROWS and (kernels := self.kernels_for(x)) is not None:
            return kernels.q8(x, self.q, self.scale, x.dtype)
        flat = x.reshape(rows, -1)
        if self.q.shape[-1] % 16:  # ATen's kernel reads K in blocks of 16: with any other K it
            y = flat.float() @ self.dequantize().T  # crashes or returns garbage (torch 2.13)
        else:
            y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.q, self.scale)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def bmm(self, x: torch.Tensor) -> torch.Tensor:
        """Per matrix g of a stacked q [G, O, K]: x [G, N, K] -> [G, N, O] in x's dtype."""
        kernels = self.kernels_for(x)  # any row count: per-head matrices are small
        if kernels is not None:
            return kernels.q8(x, self.q, self.scale, x.dtype)
        return torch.bmm(x, self.dequantize().to(x.dtype).transpose(1, 2))

    def kernels_for(self, x: torch.Tensor) -> native.Kernels | None:
        """The native kernels, where they run for x against these weights (their K a multiple
        of 32, contiguous), else None."""
        if self.q.shape[-1] % 32 or not (self.q.is_contiguous() and self.scale.is_contiguous()):
            return None
        return native.kernels_for(x)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[..., None]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


def _row_kernels(x: torch.Tensor, w_rows: torch.Tensor, dtype: torch.dtype,
                 multiple: int) -> native.Kernels | None:  # fmt: skip
    """The native kernels for x and weight rows w_rows [..., O, K] both of `dtype` (nn.Linear's
    layout, contiguous, K a multiple of `multiple`: one vector of the kernel's k-step), else
    None."""
    if x.dtype == w_rows.dtype == dtype and x.shape[-1] % multiple == 0 and w_rows.is_contiguous():
        return native.kernels_for(x)
    return None


def bf16_kernels(x: torch.Tensor, w_rows: torch.Tensor) -> native.Kernels | None:
    """`_row_kernels` for bf16 (K a multiple of 32). Callers bound the rows: from 4 rows on
    MKL's bf16 GEMM is faster."""
    return _row_kernels(x, w_rows, torch.bfloat16, 32)


def f32_kernels(x: torch.Tensor, w_rows: torch.Tensor) -> native.Kernels | None:
    """`_row_kernels` for fp32 (K a multiple of 16). Callers bound the rows and keep exact
    engines away."""
    return _row_kernels(x, w_rows, torch.float32, 16)


def mm(x: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    """x @ W^T for a decode weight: a float W^T [K, O] tensor or an `Int8Weight`."""
    if isinstance(w, Int8Weight):
        return w.mm(x)
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.bfloat16 and rows <= 2:  # (the dtype first: fp32 decoding of a tiny
        w_rows = w.t()  # model pays for every operator, views included)
        if (kernels := bf16_kernels(x, w_rows)) is not None:
            return kernels.bf16(x, w_rows)
        if rows == 1 and w.dtype == torch.bfloat16 and w_rows.is_contiguous():
            # one bf16 row without the kernels: torch.mv streams nn.Linear's layout up to 1.4x
            # faster than F.linear (`python bench/gemv.py --dtype bf16 --shapes big`)
            return torch.mv(w_rows, x.reshape(-1)).view(*x.shape[:-1], -1)
    return x @ w


def bmm(x: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    """x [G, N, K] @ W_g^T per matrix g: W^T [G, K, O] (a float tensor) or an `Int8Weight`."""
    if isinstance(w, Int8Weight):
        return w.bmm(x)
    if x.dtype == torch.bfloat16 and x.shape[1] <= 2:
        w_rows = w.transpose(1, 2)
        if (kernels := bf16_kernels(x, w_rows)) is not None:
            return kernels.bf16(x, w_rows)
    return torch.bmm(x, w)
