"""Named model sizes. `ModelConfig.from_preset(name)` turns one into a config.

`tiny` and `small` are ours (same family, scaled down); the two DeepSeek presets copy the
released `config.json` values (deepseek-ai/DeepSeek-V2-Lite, deepseek-ai/DeepSeek-V3).
"""

from __future__ import annotations

from typing import Any

_V3_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    # trains on a 2-core CPU in minutes: every V3 feature present (q-LoRA, groups, shared expert,
    # sigmoid router with bias, MTP), just small.
    "tiny": dict(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        max_position_embeddings=2048,
        rope_scaling=None,
    ),
    # 104.5M parameters in total (+12.6M MTP), 37.1M active per token (`nanoseek info small`)
    "small": dict(
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=224,
        num_hidden_layers=8,
        first_k_dense_replace=1,
        num_attention_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
        rope_scaling=None,
    ),
    "deepseek-v2-lite": dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        aux_loss_alpha=0.001,
        num_nextn_predict_layers=0,
        max_position_embeddings=163840,
        rope_scaling={**_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000,
        eos_token_id=100001,
        model_type="deepseek_v2",
        architectures=["DeepseekV2ForCausalLM"],
    ),
    "deepseek-v3": dict(rope_scaling=dict(_V3_YARN)),  # the dataclass defaults are V3's
}
