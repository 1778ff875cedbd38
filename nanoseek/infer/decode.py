"""The decode step's fast path: one block over the latent cache in few, memory-friendly kernels.

Shape legend: B rows, T new tokens per row (1 in decode, k+1 in verification), N = B*T tokens,
S key positions, D model dim, H heads, N_h nope head dim, R rope head dim, V value head dim,
C kv latent rank, E experts, F expert width, K experts per token.

Decoding a few tokens on CPU is bound by reading weights and by per-kernel overhead, so this file
computes the same math as the model's modules (`MLA.project_q`, `project_latent`,
`attend_absorbed`, the norms, `SwiGLU`, `MoE.forward`) differently:
- Weight layout (`DecodeWeights`): every matrix a decode step multiplies is kept as a contiguous
  W^T [in, out] copy. For a few rows, MKL streams that layout 1.3-3x faster than the [out, in]
  layout F.linear reads (lm_head: ~3x) once weights fall out of cache, which they do every step.
  The copies are refreshed when a weight changes (`refresh`, keyed on the tensor's version
  counter), so an optimizer step is seen by the next generate call (GRPO rollouts rely on it).
  Off on GPU, where F.linear's layout is the fast one. Costs one extra copy of those weights.
- RoPE as one complex multiply per tensor instead of eight real ops (`rope`), producing exactly
  `apply_rope`'s channel layout, so prefill (the model's own path) and decode share the cache.
- Absorbed attention [V3 §2.1.1; V2 §2.1] as multi-query attention: all heads share the
  latent keys, so heads fold into query rows and `[q_lat ; q_rope] . [c_KV ; k_rope]` is one
  batched matmul over the cache's side-by-side layout, the causal mask as the baddbmm bias.
  W_UK and W_UV are views of `kv_b_proj`, split once when the engine is built.
- MoE of a few tokens runs only the experts that were chosen, one small GEMM each (`sparse_moe`).
Tests compare every piece with the module it replaces (tests/infer/test_runner.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.infer.quant import QUANTIZE, Int8Weight, mm
from nanoseek.model.block import DecoderLayer
from nanoseek.model.ffn import SwiGLU
from nanoseek.model.moe import MoE
from nanoseek.model.norm import RMSNorm


# ------------------------------------------------------------------------------ weight layout
class DecodeWeights:
    """W^T copies ([..., in, out], contiguous) of weights [..., out, in], or W^T views when
    `transpose` is off. A group of weights that multiply the same input (q_a and kv_a, gate and
    up) is stored as one W^T of their concatenation along `out`: one GEMM instead of several
    (always a copy). `refresh()` re-copies the entries whose weights' storage or version changed."""

    def __init__(self, transpose: bool, quantize: str | None = None):
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        self.transpose, self.quantize = transpose, quantize
        self._entries: dict[tuple[int, ...], list] = {}  # ids -> [weights, key, W^T, experts]

    def t(self, *weights: torch.Tensor) -> torch.Tensor | Int8Weight:
        """W^T of weights registered together with `add`, or their `Int8Weight` when quantizing
        (multiply with `quant.mm`; no checks: call `refresh` once per step)."""
        return self._entries[tuple(map(id, weights))][2]

    def experts(self, weight: torch.Tensor) -> list:
        """`t(weight)` of a stacked [E, out, in] weight as a list of the E experts' W^T (split
        once per refresh: indexing a tensor per expert per step is an operator call each)."""
        entry = self._entries[(id(weight),)]
        if entry[3] is None:
            w = entry[2]
            entry[3] = [w[e] for e in range(weight.shape[0])]
        return entry[3]

    def add(self, *weights: torch.Tensor) -> None:
        ids = tuple(map(id, weights))
        if ids not in self._entries:
            self._entries[ids] = entry = [weights, None, None, None]
            self._update(entry)

    def refresh(self) -> None:
        for entry in self._entries.values():
            self._update(entry)

    def _update(self, entry: list) -> None:
        # in-place updates (optimizer steps, load_state_dict) bump _version; weights created
        # under inference_mode have no version counter (and no optimizer to change them).
        # Footgun: fused optimizer kernels (torch.optim.AdamW(fused=True)) do not bump it;
        # after such a step call torch.autograd.graph.increment_version(params), as
        # nanoseek's trainer does (train/loop.py: make_optimizer), or the cache goes stale
        key = tuple((w.data_ptr(), None if w.is_inference() else w._version) for w in entry[0])
        if key != entry[1]:
            ws = [w.detach() for w in entry[0]]
            w = ws[0] if len(ws) == 1 else torch.cat(ws, dim=-2)  # [..., out, in]
            if self.quantize == "int8":
                entry[1:] = key, Int8Weight.quantize(w), None
                return
            w_t = w.transpose(-1, -2)
            entry[1:] = key, w_t.contiguous() if self.transpose else w_t, None

    def nbytes(self) -> int:
        """Extra memory the copies take (W^T views cost nothing)."""
        return sum(
            e[2].nbytes if isinstance(e[2], Int8Weight) else e[2].numel() * e[2].element_size()
            for e in self._entries.values()
            if self.transpose or self.quantize or len(e[0]) > 1
        )


def linear(x: torch.Tensor, w_t: torch.Tensor | Int8Weight, bias: torch.Tensor | None = None):
    """F.linear with the weight given as W^T [in, out] (or quantized)."""
    y = mm(x, w_t)
    return y if bias is None else y + bias


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` in one kernel for fp32; other dtypes keep the module's rounding order."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm(x)


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """`apply_rope(x, cos, sin)` as a complex multiply. x [..., R] (pairs x[2i], x[2i+1]),
    freqs = cos + i sin broadcastable to [..., R/2] (complex64). Returns [..., R] in apply_rope's
    layout: rotated real parts first, then rotated imaginary parts; computed in fp32."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [..., R/2]
    out = torch.view_as_real(xc * freqs)  # [..., R/2, 2]
    return out.transpose(-1, -2).reshape(x.shape).to(x.dtype)


# ------------------------------------------------------------------------------ attention
def latent_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    kv: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    scale: float,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Absorbed attention over the cache: q_nope [B,T,H,N_h], q_rope [B,T,H,R], kv [B,S,C+R]
    (c_KV ; k_rope), W_UK [H,N_h,C], W_UV [H,V,C], bias [B,T*H|1,S] (0 or -inf). Returns
    [B,T,H*V]; `MLA.attend_absorbed` and `attend_plain` are the references."""
    B, T, H, Nh = q_nope.shape
    C = w_uk.shape[-1]
    q_lat = torch.bmm(q_nope.reshape(B * T, H, Nh).transpose(0, 1), w_uk)  # [H,BT,C]
    q = torch.cat((q_lat.transpose(0, 1), q_rope.reshape(B * T, H, -1)), dim=-1)  # [BT,H,C+R]
    scores = torch.baddbmm(bias, q.view(B, T * H, -1), kv.transpose(1, 2), alpha=scale)
    p = scores.float().softmax(-1).to(kv.dtype)  # [B,TH,S]
    o_lat = torch.bmm(p, kv[..., :C])  # [B,TH,C]
    o = torch.bmm(o_lat.view(B * T, H, C).transpose(0, 1), w_uv.transpose(1, 2))  # [H,BT,V]
    return o.transpose(0, 1).reshape(B, T, -1)


# ------------------------------------------------------------------------------ feed-forward
def swiglu(ffn: SwiGLU, x: torch.Tensor, dw: DecodeWeights) -> torch.Tensor:
    """SwiGLU.forward with W^T weights, gate and up as one GEMM."""
    gate, up = mm(x, dw.t(ffn.gate_proj.weight, ffn.up_proj.weight)).chunk(2, dim=-1)
    return mm(F.silu(gate).mul_(up), dw.t(ffn.down_proj.weight))


def sparse_moe(moe: MoE, x: torch.Tensor, dw: DecodeWeights) -> torch.Tensor:
    """MoE output for a handful of tokens (decode, verification); `MoE.forward` is the reference.

    x [B,T,D] -> [B,T,D]. The model's grouped path pads every expert's row block (to keep bf16
    GEMM shapes few and fp32 rounding batch-invariant, see moe.py) and reads all E experts' weights;
    here only the chosen experts run, from the W^T copies, on exactly their rows:
    - one or two tokens: K GEMVs per token, no gathers;
    - more: the token-expert pairs sorted by expert (one sort, one gather, one scatter-add), one
      GEMM pair per chosen expert on its contiguous rows, written into one output buffer.
    Measured alternative, not kept: every expert on every token as two batched matmuls with
    zero weights for the unchosen was no faster even at 8-16 tokens, where the bytes of expert
    weights read, not the kernel count, decide. Costs one host sync for the indices (free on
    CPU, a stall on GPU: the engine takes this path for at most `sparse_moe_max_tokens` tokens).
    """
    B, T, D = x.shape
    flat = x.reshape(-1, D)
    weights, indices, _ = moe.gate(flat)  # [N,K] fp32, [N,K]
    gate_up = dw.experts(moe.experts.gate_up_proj)  # E x W^T [D,2F]
    down = dw.experts(moe.experts.down_proj)  # E x W^T [F,D]
    if moe.shared_experts is not None:
        y = swiglu(moe.shared_experts, flat, dw)
    else:
        y = torch.zeros_like(flat)
    # int8 experts take bf16 inputs: cast once here, not around every GEMM (outputs are bf16
    # too and are accumulated into the fp32 y)
    xe = flat.to(torch.bfloat16) if dw.quantize else flat
    if flat.shape[0] <= 2:  # decode / a 1-draft verification: K GEMVs per token, no gathers
        for n, (es, ws) in enumerate(zip(indices.tolist(), weights.tolist())):
            xn, yn = xe[n], y[n]
            for e, w in zip(es, ws):
                gate, up = mm(xn, gate_up[e]).chunk(2)
                yn.add_(mm(F.silu(gate).mul_(up), down[e]), alpha=w)
        return y.view(B, T, D)
    K = indices.shape[1]
    expert, order = indices.reshape(-1).sort(stable=True)  # [M] pairs by expert
    counts = torch.bincount(expert, minlength=moe.n_experts).tolist()
    token = order // K  # [M]
    xs = xe[token]  # [M,D]
    outs = []
    for e, rows in enumerate(xs.split(counts)):
        if rows.shape[0]:
            gate, up = mm(rows, gate_up[e]).chunk(2, dim=-1)  # [n,F] each
            outs.append(mm(F.silu(gate).mul_(up), down[e]))  # [n,D]
    out = torch.cat(outs).to(y.dtype) * weights.reshape(-1)[order].to(y.dtype)[:, None]
    return y.index_add_(0, token, out).view(B, T, D)


# ------------------------------------------------------------------------------ the block
class DecodeLayer:
    """A DecoderLayer (or MTPLayer) run over the latent cache."""

    def __init__(self, layer: DecoderLayer, dw: DecodeWeights):
        self.layer, self.dw = layer, dw
        self.attn = a = layer.self_attn
        self.w_uk, self.w_uv = a.absorbed_weights()  # [H,N_h,C], [H,V,C] views of kv_b_proj
        self.H, self.Nh, self.C = a.n_heads, a.nope_dim, a.kv_lora_rank
        # the projections of the normed input, one GEMM: [q_a ; kv_a] (or [q ; kv_a])
        self.first = a.q_proj if a.q_lora_rank is None else a.q_a_proj
        dw.add(self.first.weight, a.kv_a_proj_with_mqa.weight)
        self.first_dim = self.first.weight.shape[0]
        mats = [a.o_proj] + ([] if a.q_lora_rank is None else [a.q_b_proj])
        mlp = layer.mlp
        ffns = [mlp] if not isinstance(mlp, MoE) else [s for s in [mlp.shared_experts] if s]
        if isinstance(mlp, MoE):
            dw.add(mlp.experts.gate_up_proj)
            dw.add(mlp.experts.down_proj)
        for ffn in ffns:
            dw.add(ffn.gate_proj.weight, ffn.up_proj.weight)
            mats.append(ffn.down_proj)
        for m in mats:
            dw.add(m.weight)

    def lin(self, m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.dw.t(m.weight), m.bias)

    def project(self, x: torch.Tensor, freqs: torch.Tensor):
        """x [B,T,D] (normed) -> q_nope [B,T,H,N_h], q_rope [B,T,H,R], c_kv [B,T,C],
        k_rope [B,T,R]: `MLA.project_q` + `project_latent` with the complex RoPE."""
        a, (B, T, _) = self.attn, x.shape
        y = mm(x, self.dw.t(self.first.weight, a.kv_a_proj_with_mqa.weight))
        q, kv = y.split([self.first_dim, y.shape[-1] - self.first_dim], dim=-1)
        if self.first.bias is not None:
            q = q + self.first.bias
        if a.kv_a_proj_with_mqa.bias is not None:
            kv = kv + a.kv_a_proj_with_mqa.bias  # [B,T,C+R]
        if a.q_lora_rank is not None:
            q = self.lin(a.q_b_proj, rms_norm(a.q_a_layernorm, q))
        q = q.view(B, T, self.H, -1)
        c_kv = rms_norm(a.kv_a_layernorm, kv[..., : self.C])
        k_rope = rope(kv[..., self.C :], freqs[:, :, 0])
        return q[..., : self.Nh], rope(q[..., self.Nh :], freqs), c_kv, k_rope

    def attention(self, x: torch.Tensor, step, cache, i: int) -> torch.Tensor:
        """x [B,T,D] (normed) -> [B,T,D]; writes the new latents to cache layer i first."""
        B = x.shape[0]
        q_nope, q_rope, c_kv, k_rope = self.project(x, step.freqs)
        cache.write(i, step.row0, step.positions, c_kv, k_rope)
        kv = cache.layer(i, step.row0, B, step.seq)  # [B,S,C+R]
        scale = self.attn.softmax_scale
        out = latent_attention(q_nope, q_rope, kv, self.w_uk, self.w_uv, scale, step.bias)
        return self.lin(self.attn.o_proj, out)

    def forward(self, x: torch.Tensor, step, cache, i: int, sparse_max_tokens: int):
        """DecoderLayer.forward over the cache: x [B,T,D] -> [B,T,D]."""
        layer = self.layer
        x = x + self.attention(rms_norm(layer.input_layernorm, x), step, cache, i)
        h = rms_norm(layer.post_attention_layernorm, x)
        if not isinstance(layer.mlp, MoE):
            return x + swiglu(layer.mlp, h, self.dw)
        if h.shape[0] * h.shape[1] <= sparse_max_tokens:
            return x + sparse_moe(layer.mlp, h, self.dw)
        return x + layer.mlp(h)[0]
