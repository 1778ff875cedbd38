"""RoPE on interleaved pairs and YaRN frequencies against the YaRN formulas written out directly."""

import math

import pytest
import torch

from nanoseek.model.rope import RotaryEmbedding, apply_rope, yarn_attention_factor, yarn_inv_freq
from tests.helpers import tiny_config


def test_interleaved_pairs_rotation():
    cfg = tiny_config()
    rope = RotaryEmbedding(cfg)
    R = cfg.qk_rope_head_dim
    pos = torch.arange(7)
    q, k = torch.randn(7, R), torch.randn(7, R)
    cos, sin = rope(pos)

    # reference: complex rotation of the pairs (x[2i], x[2i+1]) as DeepSeek's own code does
    def ref(x):
        z = torch.view_as_complex(x.view(7, R // 2, 2).contiguous())
        angle = pos[:, None].float() * rope.inv_freq
        return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).view(7, R)

    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # our layout is [evens, odds]; dot products are layout-independent
    assert torch.allclose(qr @ kr.T, ref(q) @ ref(k).T, atol=1e-5)
    perm = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
    assert torch.allclose(qr, ref(q)[:, perm], atol=1e-6)


def test_yarn_frequencies_follow_the_formula():
    rs = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
    cfg = tiny_config(qk_rope_head_dim=64, rope_scaling=rs, max_position_embeddings=163840)
    inv, scale = yarn_inv_freq(cfg)
    theta, L, s, d = 10000.0, 4096, 40.0, 64

    def corr(n):
        return d * math.log(L / (2 * math.pi * n)) / (2 * math.log(theta))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), d - 1)
    for i in range(32):
        f = theta ** (-2 * i / d)
        r = min(max((i - low) / (high - low), 0.0), 1.0)
        assert abs(inv[i].item() - (f / s * r + f * (1 - r))) < 1e-6 * f
    assert scale == 1.0  # V3: cos/sin unscaled, the temperature lives in the softmax scale


def test_frequencies_stay_fp32_in_bf16_model():
    rope = RotaryEmbedding(tiny_config()).to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32


@pytest.mark.parametrize(
    "keys, want",
    [
        ({"mscale": 1.0, "mscale_all_dim": 1.0}, 1.0),  # V3: the temperature is in softmax_scale
        ({"mscale": 0.707, "mscale_all_dim": 0.707}, 1.0),  # V2-Lite
        ({}, 0.1 * math.log(40) + 1),  # no keys: the YaRN paper's default, as transformers
        ({"mscale": 0.0, "mscale_all_dim": 0.0}, 0.1 * math.log(40) + 1),  # zeros mean unset
        ({"mscale_all_dim": 1.0}, 0.1 * math.log(40) + 1),  # one key alone: the default too
        (
            {"mscale": 1.0, "mscale_all_dim": 0.5},
            (0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1),
        ),
        ({"attention_factor": 1.25, "mscale": 1.0, "mscale_all_dim": 1.0}, 1.25),  # explicit wins
    ],
)
def test_yarn_attention_factor_defaults_like_transformers(keys, want):
    rs = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, **keys}
    assert yarn_attention_factor(rs, 40.0) == pytest.approx(want)
    cfg = tiny_config(rope_scaling=rs, max_position_embeddings=163840)
    assert yarn_inv_freq(cfg)[1] == pytest.approx(want)
    cos0 = RotaryEmbedding(cfg)(torch.zeros(1))[0]  # cos(0) * scale on every channel
    assert torch.allclose(cos0, torch.full_like(cos0, want))
