"""MLA: SDPA vs matmul reference vs absorbed (attention over the latent) all agree."""

import pytest
import torch

from nanoseek.model.mla import MLA, attention_bias, causal_attention_cpu, score_dtype
from nanoseek.model.rope import RotaryEmbedding
from tests.helpers import tiny_config

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip


def _setup(**overrides):
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    mla = MLA(cfg)
    for name, p in mla.named_parameters():
        torch.nn.init.normal_(p, 0, 0.2) if "norm" not in name else torch.nn.init.uniform_(
            p, 0.5, 1.5
        )
    rope = RotaryEmbedding(cfg)
    return cfg, mla, rope


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {"rope_scaling": YARN}])
def test_attention_impls_agree(overrides):
    cfg, mla, rope = _setup(**overrides)
    T = 24
    cos, sin = (t[:, :, None] for t in rope(torch.arange(T)[None]))
    x = torch.randn(2, T, cfg.hidden_size, requires_grad=True)
    outs, grads = {}, {}
    for impl in ("sdpa", "eager", "absorbed"):
        mla.attn_impl = impl
        x.grad = None
        mla.zero_grad()
        y = mla(x, cos, sin)
        y.square().sum().backward()
        outs[impl] = y.detach()
        grads[impl] = (x.grad.clone(), mla.kv_b_proj.weight.grad.clone())
    for impl in ("sdpa", "absorbed"):
        assert torch.allclose(outs[impl], outs["eager"], atol=1e-5), impl
        for a, b in zip(grads[impl], grads["eager"]):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), impl


def test_absorbed_decode_against_latent_prefix():
    """Queries at the end of a longer key sequence (what decoding with a latent cache does)."""
    cfg, mla, rope = _setup()
    S, T = 20, 3
    cos, sin = (t[:, :, None] for t in rope(torch.arange(S)[None]))
    x = torch.randn(1, S, cfg.hidden_size)
    with torch.no_grad():
        q_nope, q_rope, _, _ = mla.project(x[:, -T:], cos[:, -T:], sin[:, -T:])
        _, _, c_kv, k_rope = mla.project(x, cos, sin)
        assert c_kv.shape == (1, S, cfg.kv_lora_rank) and k_rope.shape == (
            1,
            S,
            cfg.qk_rope_head_dim,
        )
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        bias = attention_bias(mask[None, None], T, cfg.num_attention_heads, x)
        kv = torch.cat((c_kv, k_rope), dim=-1)
        a = mla.attend_absorbed(q_nope, q_rope, kv, bias).view(1, T, cfg.num_attention_heads, -1)
        b = mla.attend_plain(q_nope, q_rope, c_kv, k_rope, mask, impl="eager")
        full = mla.attend_plain(*mla.project(x, cos, sin)[:2], c_kv, k_rope, impl="sdpa")
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a, full[:, -T:], atol=1e-5)  # the last T rows of full causal attention


def test_absorbed_scores_in_fp32_over_a_bf16_cache():
    """A bf16 cache with an fp32 bias (`score_dtype` on CPU): scores, softmax and the latent
    output in fp32 over the bf16 values, rounded to bf16 once before W_UV; equals the same
    attention run on fp32 copies of the bf16 inputs, and the bf16-bias path to bf16 rounding."""
    cfg, mla, rope = _setup()
    mla = mla.to(torch.bfloat16)
    assert score_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    S, T, H = 20, 2, cfg.num_attention_heads
    cos, sin = (t[:, :, None] for t in rope(torch.arange(S)[None]))
    x = torch.randn(1, S, cfg.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        q_nope, q_rope, _, _ = mla.project(x[:, -T:], cos[:, -T:], sin[:, -T:])
        _, _, c_kv, k_rope = mla.project(x, cos, sin)
        kv = torch.cat((c_kv, k_rope), dim=-1)  # [1,S,C+R] bf16
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        bias32 = attention_bias(mask[None, None], T, H, x.float())
        got = mla.attend_absorbed(q_nope, q_rope, kv, bias32)
        in_bf16 = mla.attend_absorbed(q_nope, q_rope, kv, bias32.to(torch.bfloat16))
        w_uk, w_uv = mla.absorbed_weights()
        C = cfg.kv_lora_rank
        q_lat = torch.einsum("thn,hnc->thc", q_nope[0], w_uk).float()  # rounded like the bmm
        q = torch.cat((q_lat.to(torch.bfloat16).float(), q_rope[0].float()), -1)  # [T,H,C+R]
        scores = q.view(T * H, -1) @ kv[0].float().T * mla.softmax_scale + bias32[0]
        o_lat = (scores.softmax(-1) @ kv[0, :, :C].float()).to(torch.bfloat16).view(T, H, C)
        want = torch.einsum("thc,hvc->thv", o_lat, w_uv).reshape(1, T, -1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=4e-3, rtol=4e-3)
    err32 = (got.float() - want.float()).abs().max()
    err16 = (in_bf16.float() - want.float()).abs().max()
    assert err32 <= err16  # rounding the scores to bf16 (the other path) only adds error


def test_absorbed_weights_are_views_of_kv_b_proj():
    cfg, mla, _ = _setup()
    w_uk, w_uv = mla.absorbed_weights()
    H, N, V, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    assert w_uk.shape == (H, N, C) and w_uv.shape == (H, V, C)
    assert w_uk.data_ptr() == mla.kv_b_proj.weight.data_ptr()  # no copy: the split is free
    # per head, N key rows then V value rows (the released checkpoints' layout)
    w = mla.kv_b_proj.weight
    assert torch.equal(w_uk[1], w[(N + V) : (N + V) + N])
    assert torch.equal(w_uv[1], w[(N + V) + N : 2 * (N + V)])


@pytest.mark.parametrize("T,S", [(130, 130), (7, 7), (50, 131)])
def test_cpu_causal_attention_query_blocks(T, S):
    """Query blocks that skip fully masked keys: same result as one block and as the masked
    fp32 matmul reference, forward and backward (queries at the last T of S positions)."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, T, 24, requires_grad=True)
    k = torch.randn(2, 3, S, 24, requires_grad=True)
    v = torch.randn(2, 3, S, 16, requires_grad=True)
    g = torch.randn(2, 3, T, 16)
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    ref = ((q @ k.transpose(-1, -2)) * 0.3).masked_fill(~mask, float("-inf")).softmax(-1) @ v
    want = [ref, *torch.autograd.grad(ref, (q, k, v), g)]
    for blocks in (None, 1, 2, 3):
        out = causal_attention_cpu(q, k, v, 0.3, blocks=blocks)
        got = [out, *torch.autograd.grad(out, (q, k, v), g)]
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-5), blocks
