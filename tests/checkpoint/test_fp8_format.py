"""The official FP8 block-scaled format: block (de)quantisation on ragged shapes, a hand-built
FP8 checkpoint loaded exactly, and `save(fp8=True)` writing the release layout."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nanoseek
from nanoseek import CheckpointError
from nanoseek.checkpoint.fp8_format import (
    BLOCK,
    FP8_MAX,
    QUANTIZATION_CONFIG,
    block_dequantize,
    block_quantize,
    is_quantized_key,
)
from nanoseek.checkpoint.keys import hf_state_items
from tests.helpers import random_model, tiny_config

FP8 = torch.float8_e4m3fn


def blocks(rows: int, cols: int):
    """(i, j, row slice, col slice) of every 128x128 block, ragged edges included."""
    for i in range(math.ceil(rows / BLOCK)):
        for j in range(math.ceil(cols / BLOCK)):
            yield i, j, slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)


def reference_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W[i, j] = W_fp8[i, j] * scale_inv[i // 128, j // 128], one block at a time."""
    out = torch.empty(q.shape)
    for i, j, r, c in blocks(*q.shape):
        out[r, c] = q[r, c].float() * scale[i, j]
    return out


# ------------------------------------------------------------------------------- block math
@pytest.mark.parametrize("shape", [(576, 200), (100, 130), (128, 128), (1, 1), (129, 257)])
def test_block_quantize_ragged(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g)
    for n, (_, _, r, c) in enumerate(blocks(*shape)):  # very different magnitudes per block
        w[r, c] *= 10.0 ** (n % 5 - 2)
    if shape == (576, 200):
        w[128:256, 128:] = 0  # an all-zero (ragged) block
    q, scale = block_quantize(w)
    rows, cols = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    assert q.dtype == FP8 and q.shape == shape
    assert scale.dtype == torch.float32 and scale.shape == (rows, cols)

    deq = block_dequantize(q, scale)
    assert deq.dtype == torch.float32 and torch.equal(deq, reference_dequantize(q, scale))
    for i, j, r, c in blocks(*shape):
        amax = w[r, c].abs().max()
        if amax == 0:
            assert scale[i, j] == 1 and torch.all(deq[r, c] == 0)
            continue
        assert scale[i, j] == amax / FP8_MAX
        assert q[r, c].float().abs().max() == FP8_MAX  # the block's largest value uses the range
        # e4m3: 3 mantissa bits -> relative error <= 2^-4; below the smallest normal (2^-6) the
        # subnormal step is 2^-9, so absolute error <= 2^-10 (both in units of the block scale)
        err = (deq[r, c] - w[r, c]).abs()
        bound = w[r, c].abs() * 2**-4 + scale[i, j] * 2**-10
        assert torch.all(err <= bound * (1 + 1e-6)), (i, j, (err / bound).max())


def test_block_quantize_is_the_release_definition_bit_for_bit():
    """Each block of the release format, written out one block at a time: s = amax / 448
    (1 for an all-zero block), codes = e4m3(block / s). The writer (nanoseek/fp8/quant.py's
    128x128 tiling underneath) must match it bit for bit, ragged edges and bf16 input included."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(576, 300, generator=g) * 0.02).bfloat16()  # V3's kv_a_proj_with_mqa rows
    w[:128, 256:] = 0
    w[300, 5] = 3e-8  # a subnormal code in its block
    q, scale = block_quantize(w)
    for i, j, r, c in blocks(*w.shape):
        block = w[r, c].float()
        amax = block.abs().max()
        s = amax / FP8_MAX if amax > 0 else torch.tensor(1.0)
        codes = (block / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        assert scale[i, j] == s, (i, j)
        assert torch.equal(q[r, c].view(torch.uint8), codes.view(torch.uint8)), (i, j)
    assert q.is_contiguous() and scale.is_contiguous()
    # and a hand-computed block: amax 896 -> s = 2; 3 / 2 = 1.5 and 1 / 2 = 0.5 are exact codes
    q, scale = block_quantize(torch.tensor([[896.0, 3.0], [-1.0, 0.0]]))
    assert scale.tolist() == [[2.0]] and q.float().tolist() == [[448.0, 1.5], [-0.5, 0.0]]


def test_block_dequantize_to_bf16_and_bad_shapes():
    q, scale = block_quantize(torch.randn(300, 130))
    assert torch.equal(
        block_dequantize(q, scale, dtype=torch.bfloat16), reference_dequantize(q, scale).bfloat16()
    )
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        block_dequantize(q, scale[:2])
    with pytest.raises(ValueError, match="2D"):
        block_dequantize(q[None], scale)
    with pytest.raises(ValueError, match="inf/nan"):
        block_quantize(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="inf/nan"):
        block_quantize(torch.full((130, 3), float("nan")))  # nan in a ragged block
    with pytest.raises(ValueError, match="2D"):
        block_quantize(torch.zeros(2, 128, 128))


def test_which_keys_are_fp8():
    fp8 = [
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.3.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.3.self_attn.kv_b_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.3.mlp.shared_experts.down_proj.weight",
        "model.layers.3.mlp.experts.255.up_proj.weight",
        "model.layers.61.mlp.experts.0.gate_proj.weight",  # the MTP layer's projections too
    ]
    high = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.3.mlp.gate.weight",
        "model.layers.3.mlp.gate.e_score_correction_bias",
        "model.layers.61.eh_proj.weight",
        "model.layers.61.enorm.weight",
        "model.layers.61.embed_tokens.weight",
        "model.layers.61.shared_head.head.weight",
        "model.layers.61.shared_head.norm.weight",
    ]
    assert all(is_quantized_key(k) for k in fp8)
    assert not any(is_quantized_key(k) for k in high)


# ------------------------------------------------------------------------------- checkpoints
def ragged_config():
    """Dims chosen so FP8 weights have 1, 2 and 3 row blocks with partial last blocks:
    q_a [100,200] (1x2), kv_a_proj_with_mqa [320,200] (3x2, last 64 rows), kv_b [64,312] (1x3),
    dense gate/up [300,200] (3x2, last 44 rows), down [200,300] (2x3), experts [40,200]."""
    return tiny_config(
        vocab_size=50,
        hidden_size=200,
        intermediate_size=300,
        moe_intermediate_size=40,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        q_lora_rank=100,
        kv_lora_rank=312,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
    )


def test_hand_built_fp8_checkpoint_loads_exactly(tmp_path):
    cfg = ragged_config()
    model = random_model(cfg)
    g = torch.Generator().manual_seed(0)
    weights, scales, expected = {}, {}, {}
    row_blocks = set()
    for key, t in hf_state_items(model):
        if key.endswith("e_score_correction_bias"):
            weights[key] = t.float().clone()
        elif is_quantized_key(key):
            rows, cols = math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128)
            row_blocks.add((rows, t.shape[0] % 128 != 0))
            q = (torch.randn(t.shape, generator=g) * 100).clamp(-448, 448).to(FP8)
            q[:1, :1] = 0  # part of a block zero, and a zero block below
            if rows > 1:
                q[128:256, :128] = 0
            weights[key] = q
            scales[key + "_scale_inv"] = torch.rand(rows, cols, generator=g) * 1e-3 + 1e-5
            expected[key] = reference_dequantize(q, scales[key + "_scale_inv"])
        else:
            weights[key] = t.bfloat16().clone()  # like the release: bf16 outside the projections
            expected[key] = weights[key].float()
    assert {(1, True), (2, True), (3, True)} <= row_blocks
    # weights and scales in different shards, joined by the index
    save_file(weights, tmp_path / "model-00001-of-00002.safetensors")
    save_file(scales, tmp_path / "model-00002-of-00002.safetensors")
    wm = dict.fromkeys(weights, "model-00001-of-00002.safetensors")
    wm.update(dict.fromkeys(scales, "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    config = cfg.replace(quantization_config=dict(QUANTIZATION_CONFIG), torch_dtype="bfloat16")
    config.save_pretrained(tmp_path)

    loaded = nanoseek.load(tmp_path)
    assert loaded.config.quantization_config is None
    got = dict(hf_state_items(loaded))
    for key, want in expected.items():
        assert torch.equal(got[key], want), key
    for key in weights:
        if key.endswith("e_score_correction_bias"):
            assert got[key].dtype == torch.float32 and torch.equal(got[key], weights[key])

    bf16 = dict(hf_state_items(nanoseek.load(tmp_path, dtype=torch.bfloat16)))
    for key, want in expected.items():
        assert torch.equal(bf16[key], want.to(bf16[key].dtype)), key

    # a scale of the wrong shape, then a missing scale: errors name the tensor
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    bad = dict(scales)
    bad[key + "_scale_inv"] = bad[key + "_scale_inv"][:2]
    save_file(bad, tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=f"'{key}'.*expected \\(3, 2\\)"):
        nanoseek.load(tmp_path)
    del wm[key + "_scale_inv"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(
        CheckpointError, match=f"'{key}' is float8 but '{key}_scale_inv' is missing"
    ):
        nanoseek.load(tmp_path)


def test_save_fp8_writes_release_layout(tmp_path):
    model = random_model(ragged_config())
    d = tmp_path / "fp8"
    nanoseek.save(model, d, dtype=torch.bfloat16, fp8=True)
    config = json.loads((d / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    assert config["torch_dtype"] == "bfloat16"

    original = dict(hf_state_items(model))
    with safe_open(d / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        stored = {k: f.get_tensor(k) for k in f.keys()}
    n_fp8 = 0
    for key, t in original.items():
        if is_quantized_key(key):
            n_fp8 += 1
            scale = stored[key + "_scale_inv"]
            assert dtypes[key] == "F8_E4M3" and dtypes[key + "_scale_inv"] == "F32"
            assert scale.shape == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
        else:
            want = "F32" if key.endswith("e_score_correction_bias") else "BF16"
            assert dtypes[key] == want, key
            assert key + "_scale_inv" not in dtypes
    assert n_fp8 == sum(k.endswith("_scale_inv") for k in dtypes) > 0
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                "model.layers.2.eh_proj.weight", "model.layers.2.shared_head.head.weight",
                "model.layers.2.embed_tokens.weight", "model.norm.weight"):  # fmt: skip
        assert dtypes[key] == "BF16", key

    # loads back close to the original: each weight within e4m3 precision of its block
    loaded = nanoseek.load(d)
    got = dict(hf_state_items(loaded))
    for key, t in original.items():
        if is_quantized_key(key):
            scale = reference_dequantize(torch.ones(t.shape, dtype=FP8), stored[key + "_scale_inv"])
            bound = t.abs() * 2**-4 + scale * 2**-10
            assert torch.all((got[key] - t).abs() <= bound * (1 + 1e-6)), key
        elif not key.endswith("e_score_correction_bias"):
            assert torch.equal(got[key], t.bfloat16().float()), key
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, loaded(ids).logits
    # a loose check only: with std-0.15 random weights, 3-bit mantissas flip some routing choices
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9

    # dequantise -> requantise reproduces the same bytes: converting FP8 -> FP8 is lossless
    nanoseek.save(loaded, tmp_path / "again", dtype=torch.bfloat16, fp8=True)
    with safe_open(tmp_path / "again" / "model.safetensors", "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            assert torch.equal(t.view(torch.uint8) if t.dtype == FP8 else t,
                               stored[key].view(torch.uint8) if t.dtype == FP8 else stored[key]), key  # fmt: skip
