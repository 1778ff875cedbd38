"""Tiny random configs shared by the tests."""

from __future__ import annotations

import torch

from nanoseek import CausalLM, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=256,
        rope_scaling=None,
    )
    base.update(overrides)
    return ModelConfig(**base)


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.15) -> CausalLM:
    """Weights larger than the default init so routing decisions and attention patterns are not
    all alike (with std 0.006 most bugs in the router stay invisible), and a non-zero router bias."""
    torch.manual_seed(seed)
    model = CausalLM(config)
    model.init_weights(std=std)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model.eval()
