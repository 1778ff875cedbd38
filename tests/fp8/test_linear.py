"""FP8Linear: each of the three GEMMs against a float64 reference with a derived error bound,
gradients against bf16 nn.Linear, autocast, parameter sharing."""

import pytest
import torch
from torch import nn

from nanoseek.fp8 import (
    FP8Linear,
    check_fp8_weight,
    quant_error_bound,
    quantize_1x128,
    quantize_128x128,
)


def _bound(a, a_err, a_hat, b, b_err, b_hat, K):
    """|a_hat b_hat^T - a b^T| <= E_a |b|^T + |a_hat| E_b^T + fp32 accumulation (K 2^-23)."""
    return (
        a_err @ b.abs().t()
        + a_hat.abs() @ b_err.t()
        + K * 2.0**-23 * (a_hat.abs() @ b_hat.abs().t())
    )


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("M,K,N", [(150, 200, 300), (256, 256, 384)])
def test_each_gemm_against_float64(M, K, N, pow2):
    torch.manual_seed(0)
    x = torch.randn(M, K) * 2
    w = torch.randn(N, K) * 0.05
    dy = torch.randn(M, N) * 1e-3
    layer = FP8Linear(K, N, bias=False, backend="emulated", pow2_scales=pow2)
    with torch.no_grad():
        layer.weight.copy_(w)
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(dy)
    x64, w64, dy64 = x.double(), w.double(), dy.double()

    # the operands each GEMM sees, re-derived from the tiling table in nanoseek/fp8/linear.py
    xq, wq = quantize_1x128(x, pow2), quantize_128x128(w, pow2)
    x_hat, w_hat = xq.dequantize(torch.float64), wq.dequantize(torch.float64)
    ex, ew = quant_error_bound(x, xq), quant_error_bound(w, wq)
    dyq = quantize_1x128(dy, pow2)
    dy_hat, edy = dyq.dequantize(torch.float64), quant_error_bound(dy, dyq)

    # Fprop: Y = X W^T, X in 1x128 tiles along K, W in 128x128 blocks
    bound = _bound(x64, ex, x_hat, w64, ew, w_hat, K)
    assert ((y.double() - x64 @ w64.t()).abs() <= bound).all()
    # Dgrad: dX = dY W, dY in 1x128 tiles along N, W^T in the same (transposed) blocks
    bound = _bound(dy64, edy, dy_hat, w64.t(), ew.t(), w_hat.t(), N)
    assert ((xr.grad.double() - dy64 @ w64).abs() <= bound).all()
    # Wgrad: dW = dY^T X, both tiled along tokens; X is the cached FP8 copy re-tiled (V3
    # §3.3.3), so its error is the forward's plus the re-quantisation's
    dytq = quantize_1x128(dy.t(), pow2)
    xtq = quantize_1x128(xq.dequantize().t(), pow2)
    ext = ex.t() + quant_error_bound(x_hat.t().float(), xtq)
    bound = _bound(
        dy64.t(),
        quant_error_bound(dy.t(), dytq),
        dytq.dequantize(torch.float64),
        x64.t(),
        ext,
        xtq.dequantize(torch.float64),
        M,
    )
    assert ((layer.weight.grad.double() - dy64.t() @ x64).abs() <= bound).all()
    # and in aggregate: a few percent, as e4m3's 2^-4 half-ulp predicts
    assert _rel(y, x64 @ w64.t()) < 0.05
    assert _rel(xr.grad, dy64 @ w64) < 0.05
    assert _rel(layer.weight.grad, dy64.t() @ x64) < 0.06


def test_gradients_close_to_bf16_linear():
    """FP8Linear vs the bf16 nn.Linear it replaces (and both vs float64)."""
    torch.manual_seed(0)
    lin = nn.Linear(384, 256, bias=True)
    fp8 = FP8Linear.from_linear(lin, backend="emulated")
    x = torch.randn(4, 64, 384)
    dy = torch.randn(4, 64, 256)
    grads = {}
    for name, dtype in (("fp8", torch.float32), ("bf16", torch.bfloat16), ("fp64", torch.float64)):
        m = fp8 if name == "fp8" else nn.Linear(384, 256).to(dtype)
        if name != "fp8":
            m.load_state_dict(lin.state_dict())
        xr = x.to(dtype).detach().requires_grad_()
        y = m(xr)
        y.backward(dy.to(dtype))
        grads[name] = (y.detach(), xr.grad, m.weight.grad, m.bias.grad)
    for g8, g16, g64 in zip(grads["fp8"], grads["bf16"], grads["fp64"]):
        assert _rel(g16, g64) < 0.01  # bf16: ~0.3%
        assert _rel(g8, g64) < 0.05  # fp8: a few percent (2^-4 half-ulp per operand)
        assert _rel(g8, g16) < 0.05
        cos = torch.nn.functional.cosine_similarity(
            g8.flatten().double(), g16.flatten().double(), 0
        )
        assert cos > 0.998
    assert _rel(grads["fp8"][3], grads["fp64"][3]) < 1e-6  # the bias gradient is a plain sum


def test_autocast_output_dtype_and_fp32_accumulation():
    torch.manual_seed(0)
    layer = FP8Linear(256, 128, backend="emulated")
    x = torch.randn(32, 256, requires_grad=True)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert torch.equal(y16, y32.to(torch.bfloat16))  # same fp32 GEMM inside, cast at the end
    y16.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_from_linear_shares_parameters_and_state_dict():
    lin = nn.Linear(100, 60)
    sd = {k: v.clone() for k, v in lin.state_dict().items()}
    fp8 = FP8Linear.from_linear(lin, backend="emulated", pow2_scales=True)
    assert fp8.weight is lin.weight and fp8.bias is lin.bias
    assert isinstance(fp8, nn.Linear)
    assert fp8.state_dict().keys() == sd.keys()
    assert all(torch.equal(fp8.state_dict()[k], v) for k, v in sd.items())
    assert "fp8=emulated, pow2_scales=True" in repr(fp8)
    # an optimizer built on the original parameters trains the FP8 layer
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    fp8(torch.randn(8, 100)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(fp8.weight, sd["weight"])


def test_ragged_and_tiny_shapes_run():
    for K, N in [(1, 1), (24, 17), (129, 257)]:
        layer = FP8Linear(K, N, backend="emulated")
        x = torch.randn(3, 5, K, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == (3, 5, N) and x.grad.shape == x.shape
        ref = nn.functional.linear(x.detach(), layer.weight.detach(), layer.bias.detach())
        assert _rel(y, ref) < 0.06
    empty = FP8Linear(64, 32, backend="emulated")(torch.randn(0, 64))  # no tokens
    assert empty.shape == (0, 32)


@pytest.mark.filterwarnings("ignore:Initializing zero-element")
def test_weights_that_cannot_train_in_fp8_are_named():
    with pytest.raises(ValueError, match="cannot convert blk.proj to FP8.*empty"):
        FP8Linear.from_linear(nn.Linear(0, 8), name="blk.proj")
    lin = nn.Linear(16, 16)
    lin.weight.data = lin.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="blk.fp8.*float8_e4m3fn"):
        FP8Linear.from_linear(lin, name="blk.fp8")
    with pytest.raises(ValueError, match="expected a 3D weight"):
        check_fp8_weight("experts", torch.zeros(4, 4), ndim=3)
