"""Parity with transformers' DeepseekV3ForCausalLM through checkpoints, both directions:
our checkpoint -> their model, and their (randomised) model's `save_pretrained` -> ours.

transformers' DeepseekV3 router is sigmoid + noaux_tc only; softmax (V2-style) routing is checked
against DeepseekV2 in test_hf_v2.py. Its `save_pretrained` drops the MTP layers: we load those checkpoints without MTP.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, DeepseekV3ForCausalLM  # noqa: E402

import nanoseek  # noqa: E402
from tests.helpers import random_model, tiny_config  # noqa: E402

T = 40  # longer than the YaRN cases' original_max_position_embeddings (32)
TOL = 1e-4
YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}  # fmt: skip

CASES = {
    "q_lora": {},
    "no_q_lora": dict(q_lora_rank=None),
    "groups_and_dense": dict(
        n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=2, num_hidden_layers=4
    ),
    "yarn": dict(rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),  # V3's values
    # mscale != mscale_all_dim: the rotary amplitude factor no longer cancels
    "yarn_mscale": dict(
        rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8}, q_lora_rank=None
    ),
    # configs in the wild: no mscale keys -> transformers' default temperature 0.1 ln(8) + 1 on
    # the rotary channels; only mscale_all_dim -> that default plus mscale_all_dim in the softmax
    # scale; an explicit attention_factor; an untruncated ramp
    "yarn_no_mscale": dict(rope_scaling=dict(YARN), q_lora_rank=None),
    "yarn_mscale_all_dim_only": dict(rope_scaling={**YARN, "mscale_all_dim": 0.8}),
    "yarn_attention_factor": dict(rope_scaling={**YARN, "attention_factor": 1.3}),
    "yarn_no_truncate": dict(rope_scaling={**YARN, "truncate": False}),
    "tied": dict(tie_word_embeddings=True, num_nextn_predict_layers=0),
}


@pytest.fixture(autouse=True)
def quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "UNEXPECTED keys" report for MTP layers
    transformers.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(level)
    transformers.logging.enable_progress_bar()


def ids_for(config):
    return torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", CASES)
def test_ours_to_transformers(tmp_path, case):
    cfg = tiny_config(**CASES[case])
    ours = random_model(cfg)
    nanoseek.save(ours, tmp_path)
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    if cfg.tie_word_embeddings:
        assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    ids = ids_for(cfg)
    with torch.no_grad():
        want, got = ours(ids).logits, theirs(ids).logits
    assert want.abs().max() > 1  # logits of a model that does something
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("case", CASES)
def test_transformers_to_ours(tmp_path, case):
    cfg = tiny_config(**CASES[case])
    cfg.save_pretrained(tmp_path / "cfg")
    theirs = DeepseekV3ForCausalLM(AutoConfig.from_pretrained(tmp_path / "cfg")).eval()
    # their init (std 0.006, zero bias) would hide routing bugs: randomise like random_model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        for name, b in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_((torch.rand(b.shape, generator=g) - 0.5) * 0.2)
    theirs.save_pretrained(tmp_path / "hf")

    if cfg.num_nextn_predict_layers:
        with pytest.warns(UserWarning, match="no weights for them; loading without MTP"):
            ours = nanoseek.load(tmp_path / "hf")
    else:
        ours = nanoseek.load(tmp_path / "hf")
    assert len(ours.mtp) == 0
    assert ours.config.yarn_factor == cfg.yarn_factor  # their `rope_parameters` read back
    assert ours.config.softmax_scale == cfg.softmax_scale
    for mine, hf in zip(
        ours.moe_layers(), (m.mlp for m in theirs.model.layers if hasattr(m.mlp, "gate"))
    ):
        assert mine.gate.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(mine.gate.e_score_correction_bias, hf.gate.e_score_correction_bias)
    ids = ids_for(cfg)
    with torch.no_grad():
        want, got = theirs(ids).logits, ours(ids).logits
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
