"""1x128 / 128x128 quantisation: scale shapes and layout, ragged tiles, error bounds, pow2."""

import pytest
import torch

from nanoseek.fp8.quant import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    Quantized,
    quant_error_bound,
    quantize_1x128,
    quantize_128x128,
)

SHAPES = [(1, 1), (5, 128), (37, 300), (130, 257), (256, 384)]


def _wide_range(*shape, seed=0):
    """Magnitudes log-uniform over 2^-24 .. 2^8 and both signs, so tiles hold normal and
    subnormal fp8 values after scaling."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.rand(*shape, generator=g) * 32 - 24)
    return mag * torch.randint(0, 2, shape, generator=g).mul(2).sub(1)


@pytest.mark.parametrize("R,C", SHAPES)
def test_1x128_scale_shape_and_layout(R, C):
    x = torch.randn(R, C)
    q = quantize_1x128(x)
    Cb = -(-C // BLOCK)
    assert q.data.shape == (R, C) and q.data.dtype == FP8_DTYPE and q.data.is_contiguous()
    assert q.scale.shape == (R, Cb) and q.scale.dtype == torch.float32
    for r in {0, R - 1}:
        for j in {0, Cb - 1}:  # scale[r, j] covers x[r, 128j : 128j+128] (ragged at the end)
            tile = x[r, j * BLOCK : (j + 1) * BLOCK]
            assert q.scale[r, j] == tile.abs().max() / FP8_MAX


@pytest.mark.parametrize("R,C", SHAPES)
def test_128x128_scale_shape_and_layout(R, C):
    w = torch.randn(R, C)
    q = quantize_128x128(w)
    Rb, Cb = -(-R // BLOCK), -(-C // BLOCK)
    assert q.data.shape == (R, C) and q.scale.shape == (Rb, Cb)
    for i in {0, Rb - 1}:
        for j in {0, Cb - 1}:
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            assert q.scale[i, j] == block.abs().max() / FP8_MAX


def test_ragged_tile_scale_comes_from_its_real_elements():
    x = torch.zeros(2, 130)
    x[:, :128] = 1000.0  # a huge first tile must not leak into the 2-element last tile
    x[0, 128:] = torch.tensor([0.75, -3.0])  # 0.75 / s = 112: exact in e4m3
    q = quantize_1x128(x)
    assert q.scale[0, 1] == 3.0 / FP8_MAX
    assert q.scale[1, 1] == 1.0  # an all-zero tile: scale 1, no division by zero
    assert torch.equal(q.dequantize()[0, 128:], torch.tensor([0.75, -3.0]))
    assert torch.equal(q.dequantize()[1, 128:], torch.zeros(2))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("tiling", ["1x128", "128x128"])
@pytest.mark.parametrize("R,C", [(37, 300), (256, 384)])
def test_error_bound_per_element_and_per_tile(R, C, tiling, pow2):
    """|x_hat - x| <= 2^-4 |x| + 2^-10 s (half an e4m3 ulp, or half the subnormal spacing), and
    per tile <= 16 s (half an ulp of the top binade [256, 448]): see quant.py's docstring."""
    x = _wide_range(R, C)
    quant = quantize_1x128 if tiling == "1x128" else quantize_128x128
    q = quant(x, pow2=pow2)
    err = (q.dequantize().double() - x.double()).abs()
    assert (err <= quant_error_bound(x, q)).all()
    assert (err <= 16 * q.scale_per_element().double() * (1 + 2**-20)).all()
    # the bound is tight: some normal values come close to 2^-4 relative error
    s = q.scale_per_element().double()
    normal = x.double().abs() >= 2.0**-6 * s
    assert (err[normal] / x.double().abs()[normal]).max() > 0.05
    assert torch.isfinite(q.dequantize()).all()


def test_tile_amax_round_trips():
    """amax / scale = 448 is exactly representable, so each tile's largest value comes back."""
    x = torch.randn(64, 512) * 7
    q = quantize_1x128(x)
    amax_idx = x.abs().view(64, 4, 128).argmax(-1)
    orig = x.view(64, 4, 128).gather(-1, amax_idx[..., None])
    back = q.dequantize().view(64, 4, 128).gather(-1, amax_idx[..., None])
    assert torch.allclose(back, orig, rtol=2**-22, atol=0)


@pytest.mark.parametrize("tiling", ["1x128", "128x128"])
def test_pow2_scales(tiling):
    x = _wide_range(200, 300, seed=1) * 1e3
    quant = quantize_1x128 if tiling == "1x128" else quantize_128x128
    q = quant(x, pow2=True)
    m, _ = torch.frexp(q.scale)
    assert (m == 0.5).all()  # every scale is a power of two
    if tiling == "1x128":
        tiles = q.data.float().abs()
        tiles = torch.nn.functional.pad(tiles, (0, 84)).view(200, 3, 128).amax(-1)
        assert ((tiles >= 224) & (tiles <= 448)).all()  # amax / s in (224, 448], then rounded
    # exact scaling: quantising the dequantised tensor again is lossless (a tile whose amax
    # rounded down to 224 s gets scale s/2 and doubled codes: same values)
    q2 = quant(q.dequantize(), pow2=True)
    assert torch.equal(q2.dequantize(), q.dequantize())


def test_weight_blocks_are_transpose_invariant():
    """Why weights get 128x128 blocks: W^T's blocks are W's, transposed, so the forward's
    quantised weight serves the input-gradient GEMM [V3 §3.3.2]."""
    w = torch.randn(300, 200)
    q, qt = quantize_128x128(w), quantize_128x128(w.t())
    assert torch.equal(q.t().data.contiguous().view(torch.uint8), qt.data.view(torch.uint8))
    assert torch.equal(q.t().scale, qt.scale)
    assert torch.equal(q.t().dequantize(), q.dequantize().t())
    with pytest.raises(ValueError):
        quantize_1x128(w).t()  # 1x128 tiles would become 128x1: not the same tiling


def test_leading_dims_and_dtypes():
    w = torch.randn(3, 150, 200)  # [E,N,K] expert weights: blocks never cross experts
    q = quantize_128x128(w)
    assert q.scale.shape == (3, 2, 2)
    for e in range(3):
        qe = quantize_128x128(w[e])
        assert torch.equal(q[e].data.view(torch.uint8), qe.data.view(torch.uint8))
        assert torch.equal(q[e].scale, qe.scale)
    x = torch.randn(2, 5, 200, dtype=torch.bfloat16)  # [B,T,K]
    qx = quantize_1x128(x)
    assert qx.scale.shape == (2, 5, 2)
    assert torch.equal(qx.dequantize(), quantize_1x128(x.float()).dequantize())
    assert isinstance(qx.rows(0, 1), Quantized)
