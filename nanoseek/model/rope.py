"""Rotary position embedding with YaRN [arXiv 2309.00071] on DeepSeek's interleaved pairs.

Only the `qk_rope_head_dim` (R) decoupled channels of queries and the shared key are rotated
[V3 eqs. 3, 5]. The checkpoints pair channels as (x[2i], x[2i+1]).
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig
from nanoseek.model.buffers import FixedDtypeBuffers


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 [arXiv 2309.00071 eq. 21]."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn_attention_factor(rope_scaling: dict, factor: float) -> float:
    """The cos/sin scale of a YaRN config, as transformers' `_compute_yarn_parameters` and
    DeepSeek's Hugging Face code (`DeepseekV2YarnRotaryEmbedding`) compute it.

    An explicit `attention_factor` wins. With both `mscale` and `mscale_all_dim` set it is
    mscale(factor, mscale)/mscale(factor, mscale_all_dim): exactly 1 for V3 and V2-Lite, whose
    temperature lives in the softmax scale instead (`ModelConfig.softmax_scale`). Otherwise it is
    the paper's default 0.1 ln(factor) + 1 - a YaRN config without those keys (as many
    fine-tunes and converters write) still gets its temperature, on the rotary channels.
    """
    explicit = rope_scaling.get("attention_factor")
    if explicit is not None:
        return float(explicit)
    m, m_all = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if m and m_all:
        return yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
    return yarn_mscale(factor)


def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [R/2] fp32, cos/sin scale) for the config's rope scaling.

    YaRN [arXiv 2309.00071]: frequencies that rotate fewer than `beta_slow` times over the original
    context are interpolated by 1/factor, those rotating more than `beta_fast` times are kept, with a
    linear ramp between; the ramp's ends are rounded outwards unless `truncate` is false (as in
    transformers). The cos/sin scale is `yarn_attention_factor`.
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = config.rope_scaling
    factor = config.yarn_factor
    if rs is None or factor <= 1.0:
        return inv_freq, 1.0
    original = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, yarn_attention_factor(rs, factor)


class RotaryEmbedding(FixedDtypeBuffers):
    """Maps positions to (cos, sin), each `[*positions.shape, R/2]` in fp32."""

    # the frequencies stay fp32 in a bf16 model: bf16 angles at position 163,840 are noise
    fixed_dtypes = {"inv_freq": torch.float32}

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.scale = yarn_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.float()
        return angles.cos() * self.scale, angles.sin() * self.scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of the last dim by angle i.

    x: [..., R]; cos, sin: broadcastable to [..., R/2]. The result is laid out as
    [rotated evens, rotated odds] rather than re-interleaved: the same fixed permutation applied to
    queries and keys leaves every dot product q.k unchanged, and it saves a strided copy
    (transformers does the same with `rope_interleave`). Computed in fp32, returned in x's dtype.
    """
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def apply_rope_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """`apply_rope(x, cos, sin)` as one complex multiply (fewer kernels: what decoding a few
    tokens wants). freqs = cos + i sin (complex64) broadcastable to [..., R/2]. Same layout as
    `apply_rope`: rotated real parts first, then rotated imaginary parts; fp32 inside."""
    fp32 = x.dtype == torch.float32  # no-op casts are operator calls too
    xc = torch.view_as_complex((x if fp32 else x.float()).unflatten(-1, (-1, 2)))  # [..., R/2]
    out = torch.view_as_real(xc * freqs).transpose(-1, -2).reshape(x.shape)  # [..., R]
    return out if fp32 else out.to(x.dtype)
