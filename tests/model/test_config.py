import json

import pytest

from nanoseek import ConfigError, ModelConfig


def test_presets_build_and_round_trip(tmp_path):
    for name in ("tiny", "small", "deepseek-v2-lite", "deepseek-v3"):
        cfg = ModelConfig.from_preset(name)
        cfg.save_pretrained(tmp_path / name)
        again = ModelConfig.from_pretrained(tmp_path / name)
        assert again == cfg, name


def test_v3_softmax_scale_includes_mscale_squared():
    cfg = ModelConfig.from_preset("deepseek-v3")
    assert cfg.softmax_scale == pytest.approx(0.135234, abs=1e-6)  # 192**-0.5 * (0.1 ln 40 + 1)**2


def test_rope_parameters_accepted_and_unknown_keys_kept(tmp_path):
    d = ModelConfig.from_preset("tiny").to_dict()
    del d["rope_scaling"], d["rope_theta"]
    d["rope_parameters"] = {
        "rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
        "original_max_position_embeddings": 512, "mscale_all_dim": 1.0,
    }  # fmt: skip
    d["my_custom_key"] = {"a": 1}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg.rope_theta == 50000.0
    assert cfg.yarn_factor == 4.0
    assert cfg.extra["my_custom_key"] == {"a": 1}
    assert cfg.to_dict()["my_custom_key"] == {"a": 1}


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("n_routed_experts", 9, "n_group"),
        ("topk_group", 5, "topk_group"),
        ("num_experts_per_tok", 9, "num_experts_per_tok"),
        ("qk_rope_head_dim", 7, "even"),
        ("hidden_size", 0, "positive"),
        ("scoring_func", "relu", "sigmoid"),
        ("first_k_dense_replace", 9, "first_k_dense_replace"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "not supported"),
        ("q_lora_rank", -1, "q_lora_rank"),
    ],
)
def test_bad_values_name_the_field(field, value, words):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny", **{field: value})
    msg = str(e.value)
    assert f"'{field}'" in msg and words in msg and "\n" not in msg


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": "big"}))
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_pretrained(tmp_path)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="tiny"):
        ModelConfig.from_preset("huge")
