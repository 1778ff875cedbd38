"""Multi-head Latent Attention [V3 §2.1.1, eqs. 1-11; V2 §2.1].

Shape legend: B batch, T query tokens, S key tokens, D model dim, H heads, N nope head dim,
R rope head dim, V value head dim, C kv latent rank (kv_lora_rank), Q q latent rank.

Keys and values come from one compressed latent c_KV [C] per token plus one rotated key k_R [R]
shared by all heads; only those C + R numbers need caching. Two ways to attend:
- plain: decompress c_KV with kv_b_proj into per-head k_nope [N] and v [V], then ordinary
  attention (SDPA, or the `eager` matmul reference). Cheapest for training and long prefill.
- absorbed: fold kv_b_proj's key half into the query and its value half into the output, and
  attend over the latent directly (multi-query attention with score dim C + R, value dim C).
  Cheapest for decoding against a latent cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope, apply_rope_complex
from nanoseek.model.weights import MODULE_WEIGHTS

ATTN_IMPLS = ("sdpa", "eager", "absorbed")


def score_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype absorbed attention over a latent cache of `dtype` computes in: fp32 on CPU.
    oneDNN, which runs bf16 / fp16 batched matmuls on CPU, is slower at a decode step's shapes
    ([T*H, C+R] queries against S keys) than upcasting the cache and using MKL's fp32, even
    at 3,000 cached tokens (an 803M model's bf16 decode step: 5-8% faster at 27 cached tokens,
    7-13% at 1,000 and 3,000, `bench/vs_llamacpp.py`'s model, 2 threads); elsewhere the
    cache's own dtype."""
    return torch.float32 if device.type == "cpu" else dtype


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads = c.num_attention_heads
        self.q_lora_rank = c.q_lora_rank
        self.kv_lora_rank = c.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        )
        self.qk_dim = c.qk_head_dim
        self.softmax_scale = c.softmax_scale  # includes YaRN's mscale**2
        self.attn_impl = "sdpa"
        bias = c.attention_bias
        H = self.n_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * self.qk_dim, bias=False)
        # one projection yields the latent (first C) and the shared rope key (last R)
        self.kv_a_proj_with_mqa = nn.Linear(
            c.hidden_size, c.kv_lora_rank + self.rope_dim, bias=bias
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        # rows per head: N key rows, then V value rows
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, c.hidden_size, bias=bias)

    # ------------------------------------------------------------------ projections
    def project(self, x, cos, sin, weights=MODULE_WEIGHTS, freqs=None):
        """x [B,T,D] -> q_nope [B,T,H,N], q_rope [B,T,H,R] (rotated), and what a cache keeps:
        c_kv [B,T,C] (normalised), k_rope [B,T,R] (rotated). cos/sin [B|1,T,1,R/2]; `freqs`
        (cos + i sin, complex64) rotates with one complex multiply instead."""
        B, T, _ = x.shape
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        q, kv = weights.linear(x, first, self.kv_a_proj_with_mqa)
        if self.q_lora_rank is not None:
            q = weights.norm(self.q_a_layernorm, q)  # [V3 eqs. 1-3]
            (q,) = weights.linear(q, self.q_b_proj)
        # split_with_sizes: Tensor.split is a Python wrapper around it (1.4% of the samples of a
        # bf16 decode step under py-spy)
        q_nope, q_rope = q.view(B, T, self.n_heads, self.qk_dim).split_with_sizes(
            [self.nope_dim, self.rope_dim], dim=-1
        )
        c_kv, k_rope = kv.split_with_sizes([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = weights.norm(self.kv_a_layernorm, c_kv)  # [V3 eq. 1]
        if freqs is None:
            q_rope = apply_rope(q_rope, cos, sin)
            k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)  # [V3 eq. 3]
        else:  # the heads' queries and the shared key in one complex multiply [B,T,H+1,R]
            both = apply_rope_complex(torch.cat((q_rope, k_rope.unsqueeze(2)), dim=2), freqs)
            q_rope, k_rope = both[:, :, : self.n_heads], both[:, :, self.n_heads]
        return q_nope, q_rope, c_kv, k_rope

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK [H,N,C], W_UV [H,V,C]. Views, no copy: they follow the
        weights through optimizer steps and `load_state_dict`."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    # ------------------------------------------------------------------ attention cores
    def attend_plain(self, q_nope, q_rope, c_kv, k_rope, mask=None, impl: str = "sdpa"):
        """Decompressed attention. q_* [B,T,H,*], c_kv [B,S,C], k_rope [B,S,R]; mask is None
        (causal, queries at the last T of S positions) or a bool [B|1, 1|H, T, S] with
        True = attend. Returns [B,T,H,V]."""
        B, S, _ = c_kv.shape
        H = self.n_heads
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope_dim + self.v_dim)  # [V3 eqs. 2, 4]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        # concatenating the head-major views writes q and k contiguous as [B,H,*,N+R] in one copy
        q = torch.cat((q_nope.transpose(1, 2), q_rope.transpose(1, 2)), dim=-1)  # [B,H,T,N+R]
        k_rope = k_rope.unsqueeze(1).expand(B, H, S, self.rope_dim)  # shared by all heads
        k = torch.cat((k_nope.transpose(1, 2), k_rope), dim=-1)  # [B,H,S,N+R]
        v = v.transpose(1, 2)  # [B,H,S,V]
        if impl == "sdpa" and mask is None and q.device.type == "cpu":
            out = causal_attention_cpu(q, k, v, self.softmax_scale)
        elif impl == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale
            )
        else:  # the matmul reference
            scores = (q @ k.transpose(-1, -2)).float() * self.softmax_scale  # [B,H,T,S]
            scores = scores.masked_fill(
                ~_mask_or_causal(mask, q.shape[2], S, q.device), float("-inf")
            )
            out = scores.softmax(-1).to(v.dtype) @ v
        return out.transpose(1, 2)  # [B,T,H,V]

    def attend_absorbed(self, q_nope, q_rope, kv, bias, weights=MODULE_WEIGHTS):
        """Attention over the latent [V3 §2.1.1 'absorb'; V2 §2.1] as multi-query attention:
        every head shares the keys [c_KV ; k_rope] and the values c_KV, so heads fold into query
        rows, `[q_nope W_UK ; q_rope] . [c_KV ; k_rope]` is one batched matmul with the mask as
        its additive bias, and W_UV maps the latent output back per head.

        q_nope [B,T,H,N], q_rope [B,T,H,R], kv [B,S,C+R] (c_KV then k_rope: the cache's
        layout), bias [B|1, T*H|1, S] (0 or -inf, in `score_dtype`; rows are (t, h) pairs).
        Returns [B,T,H*V]; `attend_plain` is the reference."""
        B, T, H, N = q_nope.shape
        C = self.kv_lora_rank
        dtype = kv.dtype
        w_uk, w_uv_t = weights.absorbed(self)  # [H,N,C], [H,C,V]
        q_lat = weights.bmm(q_nope.reshape(B * T, H, N).transpose(0, 1), w_uk)  # [H,BT,C]
        q = torch.cat((q_lat.transpose(0, 1), q_rope.reshape(B * T, H, -1)), dim=-1)  # [BT,H,C+R]
        if bias.dtype != dtype:  # scores in fp32 over a bf16 / fp16 cache (`score_dtype`)
            q, kv = q.to(bias.dtype), kv.to(bias.dtype)
        scores = torch.baddbmm(
            bias, q.view(B, T * H, -1), kv.transpose(1, 2), alpha=self.softmax_scale
        )  # [B,TH,S]
        if scores.dtype == torch.float32:  # (the casts below are operators even as no-ops)
            p = scores.softmax(-1)
        else:
            p = scores.float().softmax(-1).to(kv.dtype)
        o_lat = torch.bmm(p, kv[..., :C])  # [B,TH,C]
        if o_lat.dtype != dtype:
            o_lat = o_lat.to(dtype)
        o = weights.bmm(o_lat.view(B * T, H, C).transpose(0, 1), w_uv_t)  # [H,BT,V]
        return o.transpose(0, 1).reshape(B, T, -1)

    def forward(self, x, cos, sin, mask=None, cache=None):
        """x [B,T,D] -> [B,T,D]. Without `cache`: causal self-attention over x (mask None) or
        under `mask`. With `cache` (one layer's view of a latent cache, nanoseek/infer/cache.py)
        the new latents are written to it first; a prefill (every row from position 0) attends
        over the fresh latents like training, a decode or verification step attends absorbed
        over the whole cache, each row under its own causal bias."""
        B, T, _ = x.shape
        if cache is not None and not cache.prefill:
            return cache.weights.mla_decode(self, x, cache)  # `decode`, or fused
        weights = MODULE_WEIGHTS if cache is None else cache.weights
        freqs = None if cache is None else cache.freqs
        q_nope, q_rope, c_kv, k_rope = self.project(x, cos, sin, weights, freqs)
        if cache is not None:
            cache.write(c_kv, k_rope)
        if self.attn_impl == "absorbed":
            kv = torch.cat((c_kv, k_rope), dim=-1)
            out = self.attend_absorbed(q_nope, q_rope, kv, attention_bias(mask, T, self.n_heads, x))
        else:
            out = self.attend_plain(q_nope, q_rope, c_kv, k_rope, mask, impl=self.attn_impl)
        return weights.linear(out.reshape(B, T, -1), self.o_proj)[0]

    def decode(self, x, cache):
        """x [B,T,D] -> [B,T,D] for new tokens after cached ones (a decode or verification step):
        their latents are written to `cache` (a layer's view of a decode step), then every query
        attends absorbed over the row's cache under the step's causal bias. What
        `weights.mla_decode` computes (the reference of its fused implementations)."""
        weights, st = cache.weights, cache.step
        q_nope, q_rope, c_kv, k_rope = self.project(x, st.cos, st.sin, weights, cache.freqs)
        kv = cache.write(c_kv, k_rope)  # [B,S,C+R]: the cached positions and the new ones
        out = self.attend_absorbed(q_nope, q_rope, kv, cache.bias, weights)
        return weights.linear(out, self.o_proj)[0]


def attention_bias(mask, T: int, H: int, x: torch.Tensor) -> torch.Tensor:
    """A bool mask [B|1, 1|H, T, S] (None: causal over T keys) as the additive bias
    `attend_absorbed` takes: [B|1, T*H, S], 0 where attended, -inf elsewhere."""
    allowed = _mask_or_causal(mask, T, T, x.device)
    if allowed.dim() == 2:
        allowed = allowed[None, None]  # [1,1,T,S]
    allowed = allowed.transpose(1, 2).expand(allowed.shape[0], T, H, allowed.shape[-1])
    bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
    return bias.masked_fill_(~allowed, float("-inf")).flatten(1, 2)


def causal_attention_cpu(q, k, v, scale: float, blocks: int | None = None) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v, queries at the last T of S positions. q [B,H,T,Dq],
    k [B,H,S,Dq], v [B,H,S,V] -> [B,H,T,V].

    Speed trick for CPU training: SDPA's CPU math kernel upcasts bf16 to fp32 and builds masks
    with extra passes, and its flash kernel needs V == Dq (MLA has 64 vs 96 here). One baddbmm
    that adds the causal mask as a bias while scaling, a softmax (fp32 inside) and one bmm are
    ~2.5x faster in bf16 and ~1.2x in fp32 (fwd + bwd, [8,4,256,96]). Like HF's eager path, the
    bf16 scores are rounded to bf16 before the softmax; `impl="eager"` keeps them in fp32.

    The queries are split into `blocks` row blocks (2 from T = 128 on), each scored only against
    the keys it may see: with 2, the upper right quarter of the [T,S] scores (all masked) is
    never computed, ~10% (bf16) to ~14% (fp32) off the attention core, forward and backward.
    The skipped keys had exp(-inf) = 0 weight, so the output is unchanged; in bf16 the key and
    value gradients are summed over the blocks, one more rounding.
    """
    B, H, T, Dq = q.shape
    S = k.shape[2]
    if blocks is None:
        blocks = 2 if T >= 128 and T % 2 == 0 else 1
    q3, k3, v3 = q.reshape(B * H, T, Dq), k.reshape(B * H, S, Dq), v.reshape(B * H, S, -1)
    outs, rows = [], T // blocks
    for i in range(blocks):
        t0, t1 = i * rows, T if i == blocks - 1 else (i + 1) * rows
        keys = S - T + t1  # the last query of this block sees keys [0, keys)
        bias = torch.zeros(t1 - t0, keys, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~_mask_or_causal(None, t1 - t0, keys, q.device), float("-inf"))
        scores = torch.baddbmm(bias, q3[:, t0:t1], k3[:, :keys].transpose(1, 2), alpha=scale)
        outs.append(torch.bmm(scores.softmax(-1), v3[:, :keys]))  # [B*H,t1-t0,V]
    out = outs[0] if blocks == 1 else torch.cat(outs, dim=1)
    return out.view(B, H, T, -1)


def _mask_or_causal(mask, T: int, S: int, device) -> torch.Tensor:
    """Bool mask, True = attend; causal with queries at the last T of S positions by default."""
    if mask is not None:
        return mask
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
