"""A checkpoint streamed straight into int8 decode weights: the parameters the sink takes stay
on the meta device, and the engine's output equals in-memory int8 decoding of the same model."""

import pytest
import torch

import nanoseek
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.quant import Int8Weight
from nanoseek.infer.runner import ModelRunner
from nanoseek.infer.streamed import load_int8
from tests.helpers import random_model, tiny_config


@pytest.fixture
def model_and_dirs(tmp_path):
    model = random_model(tiny_config(q_lora_rank=None)).to(torch.bfloat16)
    nanoseek.save(model, tmp_path / "bf16")
    nanoseek.save(model, tmp_path / "fp8", fp8=True)
    return model, tmp_path


def test_matrices_stay_on_meta_and_the_rest_is_loaded(model_and_dirs):
    model, d = model_and_dirs
    streamed, weights = load_int8(d / "bf16")
    params = dict(streamed.named_parameters())
    meta = {n for n, p in params.items() if p.is_meta}
    assert "model.layers.1.mlp.experts.gate_up_proj" in meta and "lm_head.weight" in meta
    assert "model.layers.0.self_attn.q_proj.weight" in meta
    for kept in ("model.embed_tokens.weight", "model.layers.0.self_attn.kv_b_proj.weight",
                 "model.layers.1.mlp.gate.weight", "model.norm.weight"):  # fmt: skip
        assert not params[kept].is_meta
        torch.testing.assert_close(params[kept], dict(model.named_parameters())[kept])
    assert not weights.modules_hold_weights
    # the stacked expert copy: expert 3's gate rows then up rows, as the model stacks them
    w = model.model.layers[1].mlp.experts.gate_up_proj
    got = weights.experts(streamed.model.layers[1].mlp.experts.gate_up_proj)[3]
    torch.testing.assert_close(got.q, Int8Weight.quantize(w[3]).q)


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@torch.inference_mode()
def test_logits_equal_in_memory_int8(model_and_dirs, fmt):
    """Prefill and decode of the streamed model against the in-memory model whose every forward
    multiplies through int8 copies made from the same weights (FP8: from its dequantised
    weights, loaded in full)."""
    model, d = model_and_dirs
    ref = model if fmt == "bf16" else nanoseek.load(d / fmt, dtype=torch.bfloat16)
    streamed, weights = load_int8(d / fmt)
    a = ModelRunner(streamed, 2, 16, weights=weights)
    b = ModelRunner(ref, 2, 16, quantize="int8")
    b.weights.modules_hold_weights = False  # prefill in int8 too, as the streamed model must
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    la, _ = a.prefill(ids[:, :6], [6, 4], 0)
    lb, _ = b.prefill(ids[:, :6], [6, 4], 0)
    torch.testing.assert_close(la, lb, atol=1e-2, rtol=1e-2)
    for t in range(6, 10):
        la, _ = a.decode(ids[:, t : t + 1])
        lb, _ = b.decode(ids[:, t : t + 1])
        torch.testing.assert_close(la, lb, atol=1e-2, rtol=1e-2)


def test_engine_generates(model_and_dirs):
    _, d = model_and_dirs
    streamed, weights = load_int8(d / "bf16")
    engine = Engine(streamed, max_batch_size=2, max_seq_len=80, weights=weights)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    long_prompt = list(range(3, 73))  # 70 tokens: the MoE's per-expert path past few_tokens
    out = engine.generate([[5, 6, 7], long_prompt], params)
    assert [len(c.token_ids) for c in out] == [8, 8]
