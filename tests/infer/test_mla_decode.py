"""`weights.mla_decode`: a few tokens of MLA over the latent cache in one native call (int8
engines, bf16 models, fp32 models unless exact) against `MLA.decode`, the composition it replaces: the output, the cache
entry it writes, where it applies and where it must not."""

import pytest
import torch

from nanoseek import Engine, SamplingParams
from nanoseek.infer import native
from nanoseek.infer.cache import CacheStep, LatentCache
from nanoseek.infer.weights import FEW_TOKENS, DecodeWeights
from nanoseek.model.mla import MLA
from nanoseek.model.rope import RotaryEmbedding
from tests.helpers import random_model, tiny_config

KERNELS = native.kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=f"native kernels: {native.reason()}")


def config(**overrides):
    # widths the kernels take (multiples of 32); 6 heads: a block of 4 and a tail of 2
    base = dict(hidden_size=128, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=6)  # fmt: skip
    return tiny_config(**{**base, **overrides})


def mla_of(cfg, seed=0):
    torch.manual_seed(seed)
    mla = MLA(cfg)
    for p in mla.parameters():
        p.data.normal_(0, 0.1)
    return mla


def decode_once(mla, cfg, dtype, weights, fused: bool, seen: int, rows: int = 1, T: int = 1):
    """One step of T new tokens in each of `rows` rows (in rows 1.. of the cache: not its
    first) after seen + 5 b cached positions of random latents in row b; returns (the output
    [rows,T,D] fp32, each row's new entries [rows,T,C+R] fp32)."""
    g = torch.Generator().manual_seed(1)
    C, R, H = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    start = [seen + 5 * b for b in range(rows)]
    seq = max(start) + T
    cache = LatentCache(1, rows + 1, seq + 8, C, R, dtype)
    cache.kv[0, 1 : 1 + rows, :seq] = torch.randn(rows, seq, C + R, generator=g).to(dtype)
    x = torch.randn(rows, T, cfg.hidden_size, generator=g).to(dtype)
    positions = torch.tensor(start)[:, None] + torch.arange(T)  # [B,T]
    cos, sin = RotaryEmbedding(cfg)(positions)
    cos, sin = cos[..., None, :], sin[..., None, :]  # [B,T,1,R/2]
    allowed = torch.arange(seq) <= positions[:, :, None]  # [B,T,S], the runner's mask
    bias = torch.zeros(rows, T, seq).masked_fill_(~allowed, float("-inf"))
    bias = bias[:, :, None].expand(rows, T, H, seq).reshape(rows, T * H, seq)
    rows_t = torch.arange(1, 1 + rows)[:, None].expand(rows, T)
    step = CacheStep(cache, 1, positions, seq, False, weights, cos, sin,
                     torch.complex(cos, sin), bias, rows_t, start)  # fmt: skip
    with torch.inference_mode():
        layer = step.layer(0)
        y = weights.mla_decode(mla, x, layer) if fused else mla.decode(x, layer)
    entries = torch.stack([cache.kv[0, 1 + b, p : p + T] for b, p in enumerate(start)])
    return y.float(), entries.float()


def compose_layers(monkeypatch):
    """Decoder layers as their composition, whose MLA is this file's subject."""
    monkeypatch.setattr(DecodeWeights, "decoder_layer",
                        lambda self, layer, x, cache: layer.decode(x, cache))  # fmt: skip


def count_native(monkeypatch):
    calls = []
    real = native.Kernels.mla_decode
    monkeypatch.setattr(native.Kernels, "mla_decode",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))  # fmt: skip
    return calls


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize("q_lora", [64, None])  # None: V2-Lite's direct query projection
@pytest.mark.parametrize("seen,rows,T", [(1, 1, 1), (50, 1, 1), (130, 1, 1), (40, 1, 2),
                                          (129, 1, 4), (30, 3, 1), (60, 2, 3)])  # fmt: skip
def test_fused_matches_the_composition(kind, q_lora, seen, rows, T, monkeypatch):
    """Decode steps (T = 1) of one and three rows (of different lengths), verify steps (T = 2-4:
    each token under its causal mask); 130 keys: a softmax tail of 2 after 8 x 16."""
    cfg = config(q_lora_rank=q_lora)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    mla = mla_of(cfg).to(dtype)
    weights = DecodeWeights(False, "int8" if kind == "int8" else None)
    calls = count_native(monkeypatch)
    got, got_entry = decode_once(mla, cfg, dtype, weights, True, seen, rows, T)
    assert calls == [1]  # the native call ran, not the composition
    want, want_entry = decode_once(mla, cfg, dtype, weights, False, seen, rows, T)
    if kind == "int8":  # the same int8 products; fp32 sums in other orders
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_entry, want_entry, rtol=1e-5, atol=1e-6)
        return
    if kind == "fp32":  # the same maths, sums in other orders: against PyTorch's operators
        exact = DecodeWeights(True, None, exact=True)
        want, want_entry = decode_once(mla, cfg, dtype, exact, False, seen, rows, T)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_entry, want_entry, rtol=1e-5, atol=1e-6)
        return
    # bf16: rounded at the same points as the composition; summed in other orders, so a value
    # can land on the other side of a rounding boundary. Both must be as close to fp32 maths
    # over the same bf16 weights and inputs
    fp32 = DecodeWeights(False, exact=True)
    ref, ref_entry = decode_once(mla.float(), cfg, torch.float32, fp32, False, seen, rows, T)
    err, err_want = (got - ref).norm() / ref.norm(), (want - ref).norm() / ref.norm()
    assert err < 1.2 * err_want + 1e-3, (err, err_want)
    assert (got_entry - ref_entry).abs().max() <= 1.01 * (want_entry - ref_entry).abs().max() + 1e-6


@pytest.mark.parametrize("kind", ["fp32", "tokens", "width"])
def test_where_the_composition_runs(kind, monkeypatch):
    """Exact fp32 engines (their bits are the modules'), more than FEW_TOKENS tokens and widths
    the kernels do not take go through `MLA.decode` itself: the same numbers, no native call."""
    cfg = config(hidden_size=80 if kind == "width" else 128)  # 80: not a multiple of 32
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    mla = mla_of(cfg).to(dtype)
    weights = DecodeWeights(False, None, exact=kind == "fp32")
    calls = count_native(monkeypatch)
    rows, T = (3, FEW_TOKENS // 3 + 1) if kind == "tokens" else (1, 1)
    got, got_entry = decode_once(mla, cfg, dtype, weights, True, 20, rows, T)
    want, want_entry = decode_once(mla, cfg, dtype, weights, False, 20, rows, T)
    assert calls == []
    assert torch.equal(got, want) and torch.equal(got_entry, want_entry)


@needs_kernels
@pytest.mark.parametrize("quantize", ["int8", None])  # None: the fp32 model's own weights
def test_engine_decodes_through_it(quantize, monkeypatch):
    """Through the engine, three prompts of different lengths: every decode step of every layer
    takes one native call for all rows, and the tokens and log-probabilities match the
    composition's (int8: to the int16 rounding of activations that differ in their last bits);
    fp32 also matches an exact engine's (PyTorch's operators only) to summation order."""
    cfg = config(num_hidden_layers=2, vocab_size=64)
    model = random_model(cfg, seed=3).eval()
    prompts = [[5, 9, 2, 7, 11, 3], [8, 1], [4, 4, 6, 10, 12, 13, 14, 2, 9]]
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True)] * 3
    compose_layers(monkeypatch)  # (tests/infer/test_layer_decode.py: the whole layer fused)
    calls = count_native(monkeypatch)
    fused = Engine(model, max_batch_size=3, max_seq_len=32, quantize=quantize)
    got = fused.generate(prompts, params)
    assert len(calls) == 11 * cfg.num_hidden_layers  # 12 tokens: a prefill and 11 decode steps
    monkeypatch.setattr(
        DecodeWeights, "mla_decode", lambda self, mla, x, cache: mla.decode(x, cache)
    )
    composed = Engine(model, max_batch_size=3, max_seq_len=32, quantize=quantize)
    for g, w in zip(got, composed.generate(prompts, params)):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs),
                                   rtol=1e-3, atol=1e-3)  # fmt: skip
    if quantize is None:
        exact = Engine(model, max_batch_size=3, max_seq_len=32, exact=True)
        for g, w in zip(got, exact.generate(prompts, params)):
            assert g.token_ids == w.token_ids
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs),
                                       rtol=1e-5, atol=1e-5)  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("quantize", ["int8", None])
def test_speculative_verify_through_it(quantize, monkeypatch):
    """MTP speculative decoding in an int8 or fp32 engine: the verify steps (two tokens of a
    row) and the MTP module's drafts take the native call, and the output equals plain greedy
    decoding with the same weights, token for token (a row's numbers do not depend on how many
    tokens or rows share the call)."""
    cfg = config(num_hidden_layers=2, vocab_size=64)
    model = random_model(cfg, seed=4).eval()
    prompts = [[5, 9, 2, 7, 11, 3], [8, 1, 4]]
    params = [SamplingParams(max_new_tokens=10, ignore_eos=True)] * 2
    compose_layers(monkeypatch)
    plain = Engine(model, max_batch_size=2, max_seq_len=32, quantize=quantize).generate(
        prompts, params
    )
    tokens = []
    real = native.Kernels.mla_decode
    monkeypatch.setattr(native.Kernels, "mla_decode",
                        lambda self, x, *a: tokens.append(x.shape[1]) or real(self, x, *a))  # fmt: skip
    spec = Engine(model, max_batch_size=2, max_seq_len=32, quantize=quantize, speculative="mtp")
    for got, want in zip(spec.generate(prompts, params), plain):
        assert got.token_ids == want.token_ids
    assert 2 in tokens  # verify steps of [pending, draft] went native
