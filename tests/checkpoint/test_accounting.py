"""Parameter / KV-cache / FLOP accounting against published numbers and the meta-device model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from nanoseek import CausalLM, ModelConfig, save
from nanoseek.checkpoint.accounting import account, attention_params, measure_meta

B = 1e9


def test_deepseek_v3_published_numbers():
    a = account(ModelConfig.from_preset("deepseek-v3"))
    assert round(a.total_params / B, 1) == 671.0  # 671.03B from the config (V3 reports 671B)
    assert abs(a.active_params / B - 37.5) <= 0.2  # embedding and head included
    assert a.kv_cache_bytes_per_token == 70_272  # (512 + 64) * 2 bytes * 61 layers
    assert a.full_kv_cache_bytes_per_token == 128 * (192 + 128) * 2 * 61
    assert a.kv_cache_ratio == pytest.approx(71.1, abs=0.05)
    # embedding and head are 0.93B each; the MTP module is ~11.5B unique, ~13.5B on disk
    assert a.embedding_params == a.head_params == 129280 * 7168
    assert abs(a.mtp_params / B - 11.5) < 0.2
    assert a.mtp_params_with_copies == a.mtp_params + 2 * 129280 * 7168
    # the released checkpoint: "685B" = main + MTP with copies (+ the router biases)
    assert round(a.checkpoint_numel / B) == 684
    assert sum(a.breakdown.values()) == a.total_params


def test_deepseek_v2_lite_published_numbers():
    a = account(ModelConfig.from_preset("deepseek-v2-lite"))
    assert round(a.total_params / B, 1) == 15.7
    # published "2.4B activated": our count is 2.66B with embedding and head, 2.45B without the
    # embedding lookup
    assert abs((a.active_params - a.embedding_params) / B - 2.4) < 0.1
    assert a.mtp_params == a.mtp_params_with_copies == 0
    assert a.kv_cache_bytes_per_token == (512 + 64) * 2 * 27


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny", {}),
        ("tiny", {"q_lora_rank": None}),
        ("tiny", {"tie_word_embeddings": True}),
        ("tiny", {"n_shared_experts": 0, "moe_layer_freq": 2, "num_nextn_predict_layers": 2}),
        ("tiny", {"attention_bias": True, "first_k_dense_replace": 0}),
        ("tiny", {"n_routed_experts": None, "num_nextn_predict_layers": 0}),
        ("small", {}),
        ("deepseek-v2-lite", {}),
        ("deepseek-v3", {}),
    ],
)
def test_analytic_counts_match_meta_model(preset, overrides):
    config = ModelConfig.from_preset(preset, **overrides)
    a = account(config)
    assert measure_meta(config) == {
        "total_params": a.total_params,
        "active_params": a.active_params,
        "mtp_params": a.mtp_params,
    }


def test_attention_params_match_mla_module():
    from nanoseek.model.mla import MLA

    for overrides in ({}, {"q_lora_rank": None}, {"attention_bias": True}):
        config = ModelConfig.from_preset("tiny", **overrides)
        mm, other = attention_params(config)
        with torch.device("meta"):
            mla = MLA(config)
        assert mm + other == sum(p.numel() for p in mla.parameters())


def test_checkpoint_numel_equals_saved_tensors(tmp_path):
    config = ModelConfig.from_preset("tiny")
    save(CausalLM(config), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert numel == account(config).checkpoint_numel


def test_flops_and_kv():
    config = ModelConfig.from_preset("deepseek-v3")
    a = account(config, seq_len=4096)
    # attention core: 2 FLOPs x H x (qk + v dims) x mean causal context, every layer
    assert a.attn_flops_per_token == 61 * (2 * 128 * (192 + 128) * 4097 // 2)
    # the rest is 2 x the active matmul weights: everything active but the embedding lookup and
    # the norm vectors (a few hundred thousand values)
    matmul = (a.flops_per_token - a.attn_flops_per_token) / 2
    assert matmul == pytest.approx(a.active_params - a.embedding_params, rel=1e-4)
    assert a.train_flops_per_token == 3 * a.flops_per_token
    assert a.train_flops_per_token_with_mtp > a.train_flops_per_token
    longer = account(config, seq_len=8192)
    assert longer.flops_per_token - longer.attn_flops_per_token == matmul * 2
    assert account(config, kv_bytes_per_value=1).kv_cache_bytes_per_token == 70_272 // 2
    with pytest.raises(ValueError, match="seq_len"):
        account(config, seq_len=0)


def test_to_dict_is_json():
    d = account(ModelConfig.from_preset("tiny")).to_dict()
    assert json.loads(json.dumps(d)) == d
    for key in ("total_params", "active_params", "mtp_params", "kv_cache_bytes_per_token"):
        assert isinstance(d[key], int)
