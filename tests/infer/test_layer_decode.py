"""`weights.decoder_layer`: a whole decoder layer of a decode or verify step in one native call
against `DecoderLayer.decode`, the composition it replaces: it makes the same native calls in
the same order, so the logits and the cache must be equal bit for bit; where it applies and where
the composition must run."""

import pytest
import torch

from nanoseek.infer import native
from nanoseek.infer.runner import ModelRunner
from nanoseek.infer.weights import FEW_TOKENS, DecodeWeights
from tests.helpers import random_model, tiny_config

KERNELS = native.kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=f"native kernels: {native.reason()}")


def config(**overrides):
    # widths the kernels take (multiples of 32); layer 0 dense, layers 1-2 MoE with a shared
    # expert; 6 heads: a block of 4 and a tail of 2
    base = dict(hidden_size=128, intermediate_size=96, moe_intermediate_size=64, q_lora_rank=64,
                kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                num_attention_heads=6, num_hidden_layers=3, vocab_size=64)  # fmt: skip
    return tiny_config(**{**base, **overrides})


def count_layers(monkeypatch):
    calls = []
    real = native.Kernels.layer_decode
    monkeypatch.setattr(native.Kernels, "layer_decode",
                        lambda self, x, *a: calls.append(x.shape) or real(self, x, *a))  # fmt: skip
    return calls


def run(model, quantize, rows: int, T: int, steps: int = 4, exact: bool = False):
    """Prefill `rows` prompts of different lengths, then `steps` forwards of T tokens per row
    (T = 1: decode steps; more: verify steps); returns (the logits of every step, the cache)."""
    g = torch.Generator().manual_seed(rows * 10 + T)
    r = ModelRunner(model, max_batch=rows, max_seq_len=64, quantize=quantize, exact=exact)
    lens = [5 + 3 * b for b in range(rows)]
    ids = torch.randint(3, 60, (rows, max(lens)), generator=g)
    out = []
    with torch.inference_mode():
        r.prefill(ids, lens, 0)
        for _ in range(steps):
            logits, _ = r.decode(torch.randint(3, 60, (rows, T), generator=g))
            out.append(logits)
    return torch.cat(out, dim=1), r.cache.kv.clone()


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "bf16", "fp32", "int8-bf16"])  # the last: V2-Lite's
@pytest.mark.parametrize("q_lora", [64, None])  # None: V2-Lite's direct query projection
@pytest.mark.parametrize("rows,T", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 3), (FEW_TOKENS, 1)])
def test_fused_layer_equals_the_composition(kind, q_lora, rows, T, monkeypatch):
    """Decode steps of 1, 2 (per-token experts) and 3-8 rows (grouped experts), verify steps of
    2-3 tokens: every layer (dense and MoE) in one call, equal to the composition bit for bit."""
    model = random_model(config(q_lora_rank=q_lora), seed=rows).eval()
    if kind in ("bf16", "int8-bf16"):
        model = model.to(torch.bfloat16)
    quantize = "int8" if kind.startswith("int8") else None
    calls = count_layers(monkeypatch)
    got, got_cache = run(model, quantize, rows, T)
    assert len(calls) == 4 * model.config.num_hidden_layers  # every layer of every step
    monkeypatch.setattr(DecodeWeights, "decoder_layer",
                        lambda self, layer, x, cache: layer.decode(x, cache))  # fmt: skip
    want, want_cache = run(model, quantize, rows, T)
    assert torch.equal(got, want) and torch.equal(got_cache, want_cache)


@needs_kernels
def test_mtp_module_drafts_through_it(monkeypatch):
    """The MTP module is a decoder layer too: its drafting steps take the fused call."""
    from nanoseek import Engine, SamplingParams

    model = random_model(config(), seed=5).eval()
    calls = count_layers(monkeypatch)
    spec = Engine(model, max_batch_size=1, max_seq_len=48, speculative="mtp")
    spec.generate([[5, 9, 2, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert any(shape[1] == 2 for shape in calls)  # verify steps of [pending, draft]
    assert len(calls) > 5 * model.config.num_hidden_layers  # + the MTP module's own steps


def row_zero(model, rows: int, steps: int = 6) -> torch.Tensor:
    """Row 0's logits over `steps` decode steps of `rows` (<= 20) rows, each row prefilled alone
    (a prefill's GEMMs round a row differently with the batch; the decode steps are the
    subject). 100-token prompts: each token's keys split into 2-3 shares (51 keys a share at
    this config's 6 x 80 attention)."""
    g = torch.Generator().manual_seed(3)
    ids, toks = (
        torch.randint(3, 60, (20, 100), generator=g),
        torch.randint(3, 60, (20, steps), generator=g),
    )
    r = ModelRunner(model, max_batch=rows, max_seq_len=112)
    out = []
    with torch.inference_mode():
        for b in range(rows):
            r.prefill(ids[b : b + 1], [100 - b], b)
        for s in range(steps):
            out.append(r.decode(toks[:rows, s : s + 1])[0][0])
    return torch.stack(out)


@needs_kernels
def test_fp32_steps_of_many_rows_are_native_and_invariant(monkeypatch):
    """fp32 decode steps of up to native.F32_ROWS rows (a rollout's batch; 14 and 20 here, past the
    8 of bf16 and int8) take the native layer call, equal to the composition bit for bit; a row's
    logits do not depend on the other rows or on the thread count (each token's attention is split
    by its number of keys alone, the products by output rows)."""
    model = random_model(config(), seed=13).eval()
    calls = count_layers(monkeypatch)
    got, got_cache = run(model, None, 14, 1)
    assert len(calls) == 4 * model.config.num_hidden_layers and calls[0][0] == 14
    alone = row_zero(model, 1)
    assert torch.equal(row_zero(model, 20), alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert torch.equal(row_zero(model, 20), alone)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(DecodeWeights, "decoder_layer",
                        lambda self, layer, x, cache: layer.decode(x, cache))  # fmt: skip
    want, want_cache = run(model, None, 14, 1)
    assert torch.equal(got, want) and torch.equal(got_cache, want_cache)


@pytest.mark.parametrize("case", ["exact", "tokens", "width", "training"])
def test_where_the_composition_runs(case, monkeypatch):
    """Exact fp32 engines (PyTorch's operators), more tokens than the native calls take (fp32:
    native.F32_ROWS, 8 here), widths the kernels do not take and a layer in training mode
    compose: no native layer call, the same logits."""
    cfg = config(hidden_size=80) if case == "width" else config()  # 80: not a multiple of 32
    model = random_model(cfg, seed=7).eval()
    monkeypatch.setattr(native, "F32_ROWS", FEW_TOKENS)
    if case == "training":
        model.model.layers[1].train()
    calls = count_layers(monkeypatch)
    rows, T = (3, FEW_TOKENS // 3 + 1) if case == "tokens" else (1, 1)
    got, _ = run(model, None, rows, T, steps=2, exact=case == "exact")
    if case == "training":  # the other layers still fuse
        assert 0 < len(calls) < 2 * cfg.num_hidden_layers
    else:
        assert calls == []
    monkeypatch.setattr(DecodeWeights, "decoder_layer",
                        lambda self, layer, x, cache: layer.decode(x, cache))  # fmt: skip
    want, _ = run(model, None, rows, T, steps=2, exact=case == "exact")
    assert torch.equal(got, want)


def mtp_catch_up(model, quantize, rows: int, T: int, last_only: bool):
    """The MTP module over 4 prefilled positions per row, then T more in one decode step
    (`last_only`: only each row's last output wanted) -> (logits, hidden, its cache)."""
    g = torch.Generator().manual_seed(rows * 10 + T)
    D = model.config.hidden_size
    r = ModelRunner(model, max_batch=rows, max_seq_len=32, mtp=True, quantize=quantize)
    with torch.inference_mode():
        dt = model.dtype
        r.mtp_forward(torch.randn(rows, 4, D, generator=g).to(dt),
                      torch.randint(3, 60, (rows, 4), generator=g), 0, [0] * rows)  # fmt: skip
        logits, h = r.mtp_forward(torch.randn(rows, T, D, generator=g).to(dt),
                                  torch.randint(3, 60, (rows, T), generator=g), 0, [4] * rows,
                                  last_only=last_only)  # fmt: skip
    return logits, h, r.mtp_cache.kv.clone()


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "bf16", "fp32"])
@pytest.mark.parametrize("rows,T", [(1, 2), (1, 3), (3, 2)])
def test_last_position_only(kind, rows, T, monkeypatch):
    """An MTP catch-up step that wants only each row's last output: the FFN and the head run on
    that position alone, the cache gets every position's entry. Fused equals the composition bit
    for bit, and both equal the full step's last position (a row's numbers do not depend on the
    other tokens in the native calls)."""
    model = random_model(config(), seed=11).eval()
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    quantize = "int8" if kind == "int8" else None
    logits, h, cache = mtp_catch_up(model, quantize, rows, T, last_only=True)
    assert h.shape == (rows, 1, model.config.hidden_size) and logits.shape[1] == 1
    full_logits, full_h, full_cache = mtp_catch_up(model, quantize, rows, T, last_only=False)
    assert torch.equal(cache, full_cache) and torch.equal(h, full_h[:, -1:])
    torch.testing.assert_close(logits, full_logits[:, -1:], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(DecodeWeights, "decoder_layer",
                        lambda self, layer, x, cache: layer.decode(x, cache))  # fmt: skip
    want_logits, want_h, want_cache = mtp_catch_up(model, quantize, rows, T, last_only=True)
    assert torch.equal(h, want_h) and torch.equal(cache, want_cache)
    assert torch.equal(logits, want_logits)
