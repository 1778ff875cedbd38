"""Parameter, KV-cache and FLOP accounting for a ModelConfig, without allocating any weight.

Counts are analytic (from the config alone, so `nanoseek info` works on a 671B config.json on a
laptop); `measure_meta` is the reference path that builds the real `CausalLM` on the meta device
and classifies its parameters by name, and the tests check the two agree.

Conventions:
- `total_params`: the main model (embedding, blocks, final norm, head), no MTP modules.
- `active_params`: what one token touches: embedding row and head counted in full (as DeepSeek's
  37B figure does), attention, norms, dense FFNs, router, shared experts, and K of E routed experts.
- `mtp_params`: the MTP modules' own weights; embedding and head are shared with the main model.
  `mtp_params_with_copies` adds the copies of `embed_tokens` and `shared_head.head` that the
  released checkpoint stores in each MTP layer (V3: 11.5B unique, ~14B on disk).
- Parameters only: the router's `e_score_correction_bias` is a buffer (no gradient) and is not
  counted; `checkpoint_numel` adds it, so it equals the numbers of values a saved directory holds
  (before FP8 scales).
- FLOPs: 2 per multiply-accumulate. Forward = 2 x the active matmul weights (the embedding is a
  lookup, not a matmul; the head is a matmul) + attention scores and values, where under a causal
  mask a query at position t sees t keys, (seq_len + 1) / 2 on average. Training = 3 x forward
  (backward costs twice the forward).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from nanoseek.config import ModelConfig
from nanoseek.model.transformer import CausalLM


@dataclass
class Accounting:
    total_params: int
    active_params: int
    mtp_params: int
    mtp_params_with_copies: int
    checkpoint_numel: int  # everything a saved checkpoint holds: main + MTP copies + router biases
    embedding_params: int
    head_params: int  # 0 when tied to the embedding
    routed_expert_params: int  # all routed experts of the main model
    active_routed_expert_params: int  # the K of them one token uses, summed over MoE layers
    breakdown: dict[str, int]  # main model, by component; sums to total_params
    kv_cache_bytes_per_token: int  # MLA latent cache: (C + R) per layer
    full_kv_cache_bytes_per_token: int  # per-head K and V, as HF transformers caches them
    kv_cache_ratio: float  # full / latent
    kv_bytes_per_value: int
    seq_len: int
    flops_per_token: int  # main model forward at `seq_len`
    attn_flops_per_token: int  # the scores/values part of flops_per_token
    train_flops_per_token: int  # 3 x flops_per_token
    mtp_flops_per_token: int  # forward of all MTP modules (incl. their use of the shared head)
    train_flops_per_token_with_mtp: int  # 3 x (main + MTP forward): what pre-training costs
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ components
def attention_params(c: ModelConfig) -> tuple[int, int]:
    """(matmul weights, other: norms and biases) of one MLA block [V3 eqs. 1-11]."""
    D, H, C, R = c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    qk, V = c.qk_head_dim, c.v_head_dim
    if c.q_lora_rank is None:
        mm, other = D * H * qk, 0  # plain q_proj (V2-Lite)
    else:
        Q = c.q_lora_rank
        mm, other = D * Q + Q * H * qk, Q  # q_a_proj, q_b_proj; q_a_layernorm
        other += Q if c.attention_bias else 0
    mm += D * (C + R)  # kv_a_proj_with_mqa: latent + shared rope key
    other += C  # kv_a_layernorm
    mm += C * H * (c.qk_nope_head_dim + V)  # kv_b_proj
    mm += H * V * D  # o_proj
    if c.attention_bias:  # kv_a_proj_with_mqa and o_proj biases
        other += (C + R) + D
    return mm, other


def _moe_parts(c: ModelConfig) -> tuple[int, int, int]:
    """(router, shared experts, all routed experts) weights of one MoE layer [V3 eq. 12]."""
    D, F = c.hidden_size, c.moe_intermediate_size
    router = c.n_routed_experts * D
    shared = 3 * D * F * (c.n_shared_experts or 0)  # one SwiGLU of width n_shared * F
    routed = 3 * D * F * c.n_routed_experts
    return router, shared, routed


def _layer(c: ModelConfig, layer_idx: int) -> dict[str, int]:
    """Parameters of decoder layer `layer_idx` by component, plus 'active_routed' (K of E)."""
    mm, other = attention_params(c)
    parts = {
        "attention": mm + other,
        "attention_matmul": mm,
        "norms": 2 * c.hidden_size,  # input_layernorm, post_attention_layernorm
        "dense_ffn": 0,
        "router": 0,
        "shared_experts": 0,
        "routed_experts": 0,
        "active_routed": 0,
        "moe_bias": 0,
    }
    if c.is_moe_layer(layer_idx):
        router, shared, routed = _moe_parts(c)
        parts["router"], parts["shared_experts"], parts["routed_experts"] = router, shared, routed
        parts["active_routed"] = routed // c.n_routed_experts * c.num_experts_per_tok
        parts["moe_bias"] = c.n_routed_experts if c.has_correction_bias else 0
    else:
        parts["dense_ffn"] = 3 * c.hidden_size * c.intermediate_size
    return parts


def _layer_total(p: dict[str, int]) -> int:
    keys = ("attention", "norms", "dense_ffn", "router", "shared_experts", "routed_experts")
    return sum(p[k] for k in keys)


def _layer_active_matmul(p: dict[str, int]) -> int:
    """Weights one token multiplies with in this layer (norms and biases excluded)."""
    return (
        p["attention_matmul"]
        + p["dense_ffn"]
        + p["router"]
        + p["shared_experts"]
        + p["active_routed"]
    )


def _attn_flops(c: ModelConfig, seq_len: int) -> int:
    """Scores q.k (qk dims) and the weighted sum of values (V dims) for one layer, per token,
    averaged over a causal sequence: (seq_len + 1) / 2 keys per query. The absorbed decode path
    does more per key (C + R and C dims) but reads far less memory; this counts the plain path."""
    per_key = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    return per_key * (seq_len + 1) // 2


# ------------------------------------------------------------------------------ the account
def account(config: ModelConfig, seq_len: int = 4096, kv_bytes_per_value: int = 2) -> Accounting:
    """Everything `nanoseek info` prints, from the config alone. seq_len sets the attention
    FLOPs; kv_bytes_per_value is the cache dtype's size (2: bf16)."""
    c = config
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    D, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    embedding = V * D
    head = 0 if c.tie_word_embeddings else V * D
    layers = [_layer(c, i) for i in range(L)]

    def total_of(key: str) -> int:
        return sum(p[key] for p in layers)

    breakdown = {
        "embedding": embedding,
        "attention": total_of("attention"),
        "norms": total_of("norms") + D,  # + the final norm
        "dense_ffn": total_of("dense_ffn"),
        "router": total_of("router"),
        "shared_experts": total_of("shared_experts"),
        "routed_experts": total_of("routed_experts"),
        "head": head,
    }
    total = sum(breakdown.values())
    routed, active_routed = total_of("routed_experts"), total_of("active_routed")
    active = total - routed + active_routed

    # MTP module k is a full decoder layer at index L+k-1 plus enorm, hnorm, eh_proj [D, 2D] and
    # its own final norm (shared_head.norm) [V3 eq. 21]; embedding and head are shared
    mtp_layers = [_layer(c, L + k) for k in range(c.num_nextn_predict_layers)]
    mtp = sum(_layer_total(p) + 3 * D + 2 * D * D for p in mtp_layers)
    mtp_copies = mtp + len(mtp_layers) * 2 * V * D

    seq_attn = _attn_flops(c, seq_len)
    attn_flops = L * seq_attn
    matmul_active = sum(_layer_active_matmul(p) for p in layers) + V * D  # + the head
    flops = 2 * matmul_active + attn_flops
    mtp_flops = sum(
        2 * (_layer_active_matmul(p) + 2 * D * D + V * D) + seq_attn for p in mtp_layers
    )

    kv = (c.kv_lora_rank + c.qk_rope_head_dim) * kv_bytes_per_value * L
    full_kv = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * kv_bytes_per_value * L
    notes = []
    if c.tie_word_embeddings:
        notes.append("tie_word_embeddings: the head shares the embedding and is counted once")
    return Accounting(
        total_params=total,
        active_params=active,
        mtp_params=mtp,
        mtp_params_with_copies=mtp_copies,
        checkpoint_numel=total
        + mtp_copies
        + total_of("moe_bias")
        + sum(p["moe_bias"] for p in mtp_layers),
        embedding_params=embedding,
        head_params=head,
        routed_expert_params=routed,
        active_routed_expert_params=active_routed,
        breakdown=breakdown,
        kv_cache_bytes_per_token=kv,
        full_kv_cache_bytes_per_token=full_kv,
        kv_cache_ratio=full_kv / kv,
        kv_bytes_per_value=kv_bytes_per_value,
        seq_len=seq_len,
        flops_per_token=flops,
        attn_flops_per_token=attn_flops,
        train_flops_per_token=3 * flops,
        mtp_flops_per_token=mtp_flops,
        train_flops_per_token_with_mtp=3 * (flops + mtp_flops),
        notes=notes,
    )


# ------------------------------------------------------------------------------ reference path
def measure_meta(config: ModelConfig) -> dict[str, int]:
    """The reference count: build CausalLM on the meta device (shapes only, no storage) and
    classify its parameters by name. Returns total, active, mtp (unique) parameter counts."""
    with torch.device("meta"):
        model = CausalLM(config)
    total = active = mtp = 0
    K, E = config.num_experts_per_tok or 0, config.n_routed_experts or 1
    for name, p in model.named_parameters():  # shared (tied) parameters are yielded once
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        # routed experts are 3D [E, ...] tensors: a token uses K of the E slices
        active += n * K // E if ".mlp.experts." in name else n
    return {"total_params": total, "active_params": active, "mtp_params": mtp}
