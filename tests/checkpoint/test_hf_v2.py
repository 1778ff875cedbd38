"""A softmax-routed (DeepSeek-V2-style) model saved by nanoseek loads into transformers'
DeepseekV2ForCausalLM with no missing or unexpected tensors, and gives the same logits.

V2 routing has no `e_score_correction_bias` (that is V3's auxiliary-loss-free balancing
[V3 eq. 16]), so nanoseek writes it only for sigmoid/noaux_tc models; V3-style models keep it.
"""

import math

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
DeepseekV2ForCausalLM = getattr(transformers, "DeepseekV2ForCausalLM", None)

import nanoseek  # noqa: E402
from nanoseek.checkpoint.accounting import account  # noqa: E402
from tests.helpers import random_model, tiny_config  # noqa: E402

V2 = dict(
    scoring_func="softmax",
    topk_method="group_limited_greedy",
    norm_topk_prob=False,  # V2 scales the raw softmax weights; transformers' V2 has no option
    num_nextn_predict_layers=0,  # V2 has no MTP
    model_type="deepseek_v2",
    architectures=["DeepseekV2ForCausalLM"],
)


def saved_keys(directory):
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize(
    "routing, has_bias",
    [
        (dict(scoring_func="sigmoid", topk_method="noaux_tc"), True),  # V3
        (dict(scoring_func="softmax", topk_method="noaux_tc"), True),  # the bias selects experts
        (dict(scoring_func="sigmoid", topk_method="greedy"), True),  # V3-style scores
        (dict(scoring_func="softmax", topk_method="group_limited_greedy"), False),  # V2
        (dict(scoring_func="softmax", topk_method="greedy"), False),  # V2-Lite
    ],
)
def test_only_v3_style_routing_writes_the_bias(tmp_path, routing, has_bias):
    cfg = tiny_config(**routing)
    assert cfg.has_correction_bias is has_bias
    model = random_model(cfg)
    nanoseek.save(model, tmp_path)
    keys = saved_keys(tmp_path)
    assert any(k.endswith("e_score_correction_bias") for k in keys) is has_bias
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in keys) == (
            account(cfg).checkpoint_numel
        )
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # and it loads back the same model (a V2 router ignores the bias)
        torch.testing.assert_close(nanoseek.load(tmp_path)(ids).logits, model(ids).logits)


@pytest.mark.skipif(DeepseekV2ForCausalLM is None, reason="transformers has no DeepseekV2")
def test_v2_style_model_loads_into_transformers_deepseek_v2(tmp_path):
    cfg = tiny_config(**V2)
    ours = random_model(cfg)
    nanoseek.save(ours, tmp_path)
    transformers.logging.disable_progress_bar()
    theirs, info = DeepseekV2ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ours(ids).logits, theirs.eval()(ids).logits
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
