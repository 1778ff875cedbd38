"""The decode weight layout multiplies like the modules: fused W^T copies, per-expert pieces,
absorbed attention weights, and the model's forward through it equals the plain forward."""

import pytest
import torch

from nanoseek.infer.weights import DecodeWeights
from nanoseek.model.mla import attention_bias
from nanoseek.model.rope import apply_rope, apply_rope_complex
from nanoseek.model.weights import MODULE_WEIGHTS
from tests.helpers import random_model, tiny_config

CONFIGS = {"q_lora": {}, "no_q_lora": dict(q_lora_rank=None), "bias": dict(attention_bias=True)}


@pytest.mark.parametrize("case", CONFIGS)
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_projections_equal_the_modules(case, transpose, dtype):
    """MLA.project with the fused W^T copies and the complex RoPE gives the modules' tensors,
    channel layout included (a cache mixes prefill and decode entries)."""
    cfg = tiny_config(**CONFIGS[case])
    model = random_model(cfg).to(dtype)
    if cfg.attention_bias:
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()  # non-zero biases and norms: a dropped bias would show
    mla = model.model.layers[0].self_attn
    positions = torch.tensor([[3, 4], [40, 41]])
    cos, sin = model.rope(positions)
    x = torch.randn(2, 2, cfg.hidden_size, dtype=dtype)
    want = mla.project(x, cos, sin)
    got = mla.project(x, cos, sin, DecodeWeights(transpose), torch.complex(cos, sin))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    y = torch.randn(5, cfg.qk_rope_head_dim)
    torch.testing.assert_close(
        apply_rope_complex(y, torch.complex(cos, sin)[0, 0, 0]), apply_rope(y, cos[0, 0], sin[0, 0])
    )


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("weights", ["module", "decode"])
@torch.inference_mode()
def test_absorbed_attention_equals_plain(T, weights):
    """Queries at the end of a longer latent sequence, each row under its own causal mask:
    absorbed attention equals the decompressed (plain) attention, SDPA and matmul reference."""
    cfg = tiny_config()
    mla = random_model(cfg).model.layers[0].self_attn
    w = MODULE_WEIGHTS if weights == "module" else DecodeWeights(True)
    B, S, H = 2, 11, cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    q_nope = torch.randn(B, T, H, cfg.qk_nope_head_dim, generator=g)
    q_rope = torch.randn(B, T, H, cfg.qk_rope_head_dim, generator=g)
    c_kv = torch.randn(B, S, cfg.kv_lora_rank, generator=g)
    k_rope = torch.randn(B, S, cfg.qk_rope_head_dim, generator=g)
    last = torch.tensor([7, 10])  # row b's queries sit at positions last[b]-T+1 .. last[b]
    positions = last[:, None] - T + 1 + torch.arange(T)  # [B,T]
    mask = (torch.arange(S) <= positions[:, :, None])[:, None]  # [B,1,T,S]
    bias = attention_bias(mask, T, H, c_kv)
    got = mla.attend_absorbed(q_nope, q_rope, torch.cat((c_kv, k_rope), -1), bias, w)
    for impl in ("sdpa", "eager"):
        ref = mla.attend_plain(q_nope, q_rope, c_kv, k_rope, mask, impl=impl)
        torch.testing.assert_close(got, ref.reshape(B, T, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N", [1, 3, 9])
@pytest.mark.parametrize("weights", ["module", "transposed", "views"])
@torch.inference_mode()
def test_few_token_moe_equals_grouped(N, weights):
    """MoE.forward_few (the chosen experts only) equals the grouped dispatch."""
    cfg = tiny_config()
    moe = random_model(cfg).model.layers[1].mlp
    w = {"module": MODULE_WEIGHTS, "transposed": DecodeWeights(True),
         "views": DecodeWeights(False)}[weights]  # fmt: skip
    x = torch.randn(1, N, cfg.hidden_size)
    moe.few_tokens = 0  # the grouped path
    want = moe(x)[0]
    moe.few_tokens = 64
    torch.testing.assert_close(moe.forward_few(x, w), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe(x, None, w)[0], want, atol=1e-5, rtol=1e-5)  # dispatched


@torch.no_grad()  # not inference_mode: tensors made there have no version counter to follow
def test_copies_follow_in_place_updates_and_count_their_bytes():
    cfg = tiny_config()
    model = random_model(cfg)
    mla = model.model.layers[0].self_attn
    w = DecodeWeights(True)
    x = torch.randn(3, cfg.hidden_size)
    (before,) = w.linear(x, mla.kv_a_proj_with_mqa)
    w_uk, _ = w.absorbed(mla)
    assert w_uk.is_contiguous()  # a copy: no per-step copy in the batched matmuls
    n = w.nbytes()
    assert n >= mla.kv_b_proj.weight.numel() * 4  # the absorbed copies count
    mla.kv_a_proj_with_mqa.weight.mul_(2)  # in place, as an optimizer step
    mla.kv_b_proj.weight.mul_(2)
    w.refresh()
    torch.testing.assert_close(w.linear(x, mla.kv_a_proj_with_mqa)[0], 2 * before)
    torch.testing.assert_close(w.absorbed(mla)[0], 2 * w_uk)
    assert w.nbytes() == n
