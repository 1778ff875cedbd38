"""FP8 GEMM backends: the emulation's accumulation, the row-wise torch._scaled_mm cross-check,
backend selection, and (on an sm_90 GPU only) the real block-wise kernel against the emulation."""

import pytest
import torch

from nanoseek.fp8 import (
    AutoBackend,
    CudaBlockwiseBackend,
    EmulatedBackend,
    Quantized,
    cuda_blockwise_unavailable,
    fp8_grouped_linear,
    fp8_linear,
    get_backend,
    quantize_1x128,
    quantize_128x128,
    rowwise_scaled_mm,
)
from nanoseek.fp8.quant import FP8_DTYPE, FP8_MAX

EMU = EmulatedBackend()


def _operands(M, K, N, b_tiling, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g).to(device) * 3
    b = torch.randn(N, K, generator=g).to(device) * 0.05
    bq = quantize_1x128(b) if b_tiling == "1x128" else quantize_128x128(b)
    return quantize_1x128(a), bq


@pytest.mark.parametrize("b_tiling", ["1x128", "128x128"])
@pytest.mark.parametrize("M,K,N", [(64, 256, 96), (37, 300, 130)])
def test_emulated_is_fp32_accumulation_of_the_dequantised_operands(M, K, N, b_tiling):
    a, b = _operands(M, K, N, b_tiling)
    c = EMU.mm(a, b)
    a64, b64 = a.dequantize(torch.float64), b.dequantize(torch.float64)
    ref = a64 @ b64.t()
    bound = K * 2.0**-23 * (a64.abs() @ b64.abs().t())  # fp32 summation error, worst case
    assert c.dtype == torch.float32
    assert ((c.double() - ref).abs() <= bound).all()


def test_emulated_ignores_ambient_autocast():
    a, b = _operands(32, 256, 64, "128x128")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = EMU.mm(a, b)
    assert torch.equal(c, EMU.mm(a, b))


def _rowwise_quantized(x):
    """1x128 tiles that share one scale per row: what row-wise scaling can express."""
    s = (x.abs().amax(-1, keepdim=True) / FP8_MAX).float()  # [R,1]
    data = (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Quantized(data, s.expand(-1, -(-x.shape[1] // 128)).contiguous(), 1)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_emulated_matches_rowwise_scaled_mm(out_dtype):
    torch.manual_seed(0)
    a = _rowwise_quantized(torch.randn(48, 384))
    b = _rowwise_quantized(torch.randn(80, 384) * 0.1)
    c_emu, c_ref = EMU.mm(a, b, out_dtype), rowwise_scaled_mm(a, b, out_dtype)
    assert c_ref.dtype == out_dtype
    tol = 1e-5 if out_dtype == torch.float32 else 2**-8
    assert torch.allclose(c_emu.float(), c_ref.float(), rtol=tol, atol=tol * c_ref.abs().max())
    # one tile per row (K <= 128): the ordinary quantisers are row-wise, 128x128 blocks too
    a, b = quantize_1x128(torch.randn(40, 96)), quantize_128x128(torch.randn(200, 96))
    assert torch.allclose(EMU.mm(a, b), rowwise_scaled_mm(a, b), rtol=1e-5, atol=1e-5)


def test_rowwise_scaled_mm_refuses_tile_varying_scales():
    a, b = _operands(16, 256, 32, "1x128")
    with pytest.raises(ValueError, match="different scales"):
        rowwise_scaled_mm(a, b)


def test_operand_checks():
    a, b = _operands(16, 256, 32, "128x128")
    with pytest.raises(ValueError, match="1x128"):
        EMU.mm(b, b)
    with pytest.raises(ValueError, match=r"\[M,K\]"):
        EMU.mm(a, quantize_128x128(torch.randn(32, 128)))


def test_backend_selection():
    assert isinstance(get_backend("emulated"), EmulatedBackend)
    auto = get_backend("auto")
    assert isinstance(auto, AutoBackend) and auto.resolve("cpu").name == "emulated"
    assert get_backend(EMU) is EMU
    with pytest.raises(ValueError, match="must be one of"):
        get_backend("fp8_magic")
    assert cuda_blockwise_unavailable("cpu") is not None
    with pytest.raises(ValueError, match="cuda_blockwise.*cannot run here"):
        get_backend("cuda_blockwise", "cpu")


# ---------------------------------------------------------------- the real kernel (sm_90 only)
_NO_KERNEL = cuda_blockwise_unavailable("cuda")
needs_sm90 = pytest.mark.skipif(
    _NO_KERNEL is not None, reason=f"no block-wise FP8 kernel: {_NO_KERNEL}"
)


@pytest.fixture
def no_tf32():
    """The emulation on CUDA must run true fp32 GEMMs (TF32 would round dequantised values)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@needs_sm90
@pytest.mark.parametrize("gemm", ["fprop", "dgrad", "wgrad"])
@pytest.mark.parametrize("M,K,N", [(256, 512, 768), (200, 320, 576), (1, 64, 24)])
def test_cuda_blockwise_matches_emulated(M, K, N, gemm, no_tf32):
    """Same quantised operands on the GPU, kernel vs emulation: only the accumulation order
    (and the tensor cores' internal precision) may differ, 2^-9 of sum |a||b| at most; a wrong
    scale layout or padding would be off by O(1)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=g).cuda(), torch.randn(N, K, generator=g).cuda() * 0.05
    dy = torch.randn(M, N, generator=g).cuda()
    if gemm == "fprop":  # Y = X W^T
        a, b = quantize_1x128(x), quantize_128x128(w)
    elif gemm == "dgrad":  # dX = dY W
        a, b = quantize_1x128(dy), quantize_128x128(w).t()
    else:  # dW = dY^T X
        a, b = quantize_1x128(dy.t()), quantize_1x128(x.t())
    for out_dtype in (torch.float32, torch.bfloat16):
        c_gpu = CudaBlockwiseBackend().mm(a, b, out_dtype)
        c_emu = EMU.mm(a, b)
        assert c_gpu.shape == c_emu.shape and c_gpu.dtype == out_dtype
        scale = a.dequantize().abs() @ b.dequantize().abs().t()
        slack = 2**-9 if out_dtype == torch.float32 else 2**-7
        assert ((c_gpu.float() - c_emu).abs() <= slack * scale + 1e-6).all()


@needs_sm90
def test_cuda_linear_and_experts_match_emulated(no_tf32):
    torch.manual_seed(0)
    x = torch.randn(3, 70, 320, device="cuda", requires_grad=True)
    w = (torch.randn(576, 320, device="cuda") * 0.05).requires_grad_()
    dy = torch.randn(3, 70, 576, device="cuda")
    outs = []
    for backend in ("cuda_blockwise", "emulated"):
        x.grad = w.grad = None
        y = fp8_linear(x, w, None, get_backend(backend, "cuda"))
        y.backward(dy)
        outs.append((y.detach(), x.grad.clone(), w.grad.clone()))
    for gpu, emu in zip(*outs):
        assert ((gpu - emu).norm() / emu.norm()).item() < 2e-3
    assert get_backend("auto").resolve(x.device).name == "cuda_blockwise"

    xs = torch.randn(300, 256, device="cuda", requires_grad=True)
    we = (torch.randn(4, 384, 256, device="cuda") * 0.05).requires_grad_()
    counts = torch.tensor([100, 0, 150, 50], device="cuda")
    offs = counts.cumsum(0).to(torch.int32)
    outs = []
    for backend in ("cuda_blockwise", "emulated"):
        xs.grad = we.grad = None
        y = fp8_grouped_linear(xs, we, counts, offs, backend=get_backend(backend, "cuda"))
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xs.grad.clone(), we.grad.clone()))
    for gpu, emu in zip(*outs):
        assert ((gpu - emu).norm() / emu.norm().clamp(min=1e-12)).item() < 2e-3
