"""The cached forward: decode over the latent cache equals recomputing the whole sequence."""

import pytest
import torch

from nanoseek.infer.runner import ModelRunner
from tests.helpers import random_model, tiny_config

ATOL = 1e-4
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
CONFIGS = {
    "q_lora": {},
    "no_q_lora": dict(q_lora_rank=None),
    "yarn_dense2": dict(rope_scaling=YARN, first_k_dense_replace=2),
}


def ids_for(cfg, B, T, seed=0):
    return torch.randint(3, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CONFIGS)
@torch.inference_mode()
def test_cached_decode_equals_recompute(case):
    """Prefill 6 tokens, then decode one at a time: each step's logits equal a full forward."""
    cfg = tiny_config(**CONFIGS[case])
    model = random_model(cfg)
    ids = ids_for(cfg, 2, 20)
    full = model(ids, mtp=False).logits  # [B,T,V]
    runner = ModelRunner(model, max_batch=2, max_seq_len=32)
    logits, _ = runner.prefill(ids[:, :6], [6, 6], row0=0)
    torch.testing.assert_close(logits, full[:, 5], atol=ATOL, rtol=0)
    for t in range(6, 20):
        logits, _ = runner.decode(ids[:, t : t + 1])
        assert runner.cache.lengths[:2] == (t + 1, t + 1)  # the runner commits the lengths
        torch.testing.assert_close(logits[:, 0], full[:, t], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_batch_of_different_lengths_equals_each_alone():
    """Right-padded prefill + per-row positions: every row's logits match running it alone."""
    cfg = tiny_config()
    model = random_model(cfg)
    lens = [3, 9, 6]
    ids = ids_for(cfg, 3, 14)
    batch = ModelRunner(model, max_batch=3, max_seq_len=32)
    padded = ids[:, :9].clone()
    for b, n in enumerate(lens):
        padded[b, n:] = 0  # padding of any value
    first, _ = batch.prefill(padded, lens, row0=0)
    steps = [first]
    nxt = torch.stack([ids[b, n] for b, n in enumerate(lens)])[:, None]
    for i in range(4):  # decode: each row at its own position
        logits, _ = batch.decode(nxt)
        steps.append(logits[:, 0])
        nxt = torch.stack([ids[b, n + i + 1] for b, n in enumerate(lens)])[:, None]
    for b, n in enumerate(lens):
        alone = model(ids[b : b + 1, : n + 4], mtp=False).logits[0]
        for i, got in enumerate(steps):
            torch.testing.assert_close(got[b], alone[n - 1 + i], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_multi_token_decode_equals_one_by_one():
    """Verification feeds k+1 tokens at once; the logits equal k+1 single-token steps."""
    cfg = tiny_config()
    model = random_model(cfg)
    ids = ids_for(cfg, 2, 12)
    runner = ModelRunner(model, max_batch=2, max_seq_len=32)
    runner.prefill(ids[:, :5], [5, 4], row0=0)  # rows at different lengths
    start = [5, 4]
    chunk = torch.stack([ids[0, 5:8], ids[1, 4:7]])
    logits, _ = runner.decode(chunk, start)
    for b in range(2):
        alone = model(torch.cat((ids[b, : start[b]], chunk[b]))[None], mtp=False).logits[0]
        torch.testing.assert_close(logits[b], alone[start[b] :], atol=ATOL, rtol=0)


def test_decode_weights_follow_training_updates():
    """The W^T copies are refreshed after an in-place update (optimizer step), so the next
    decode sees the new weights."""
    cfg = tiny_config()
    model = random_model(cfg)
    runner = ModelRunner(model, max_batch=1, max_seq_len=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = ids_for(cfg, 1, 8)
    model(ids, labels=ids).loss.backward()
    opt.step()
    with torch.inference_mode():
        runner.prefill(ids[:, :6], [6], 0)
        logits, _ = runner.decode(ids[:, 6:7])
        want = model(ids[:, :7], mtp=False).logits[:, -1]
    torch.testing.assert_close(logits[:, 0], want, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_mtp_cached_equals_model_mtp_logits():
    """The MTP module over its own cache (prefill, then one position at a time) reproduces the
    model's training-time MTP logits: position i sees h_i and the embedding of t_{i+1}."""
    cfg = tiny_config()
    model = random_model(cfg)
    ids = ids_for(cfg, 2, 12)
    out = model(ids)
    want, h = out.mtp_logits[0], out.hidden_states  # [B,T-1,V], [B,T,D]
    runner = ModelRunner(model, max_batch=2, max_seq_len=32, mtp=True)
    logits, _ = runner.mtp_forward(h[:, :6], ids[:, 1:7], 0, [0, 0])  # prefill
    torch.testing.assert_close(logits, want[:, :6], atol=ATOL, rtol=0)
    for i in range(6, 11):
        logits, _ = runner.mtp_forward(h[:, i : i + 1], ids[:, i + 1 : i + 2], 0, [i, i])
        torch.testing.assert_close(logits[:, 0], want[:, i], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_bf16_decode_close_to_recompute():
    # every expert chosen: bf16 rounding can flip a near-tie top-k choice between two ways of
    # computing the same sum (a legitimate ~30% logit change); without choices, only rounding
    cfg = tiny_config(num_experts_per_tok=8, n_group=1, topk_group=1)
    model = random_model(cfg).to(torch.bfloat16)
    ids = ids_for(cfg, 1, 10)
    full = model(ids, mtp=False).logits.float()
    runner = ModelRunner(model, max_batch=1, max_seq_len=16)
    assert runner.cache.kv.dtype == torch.bfloat16
    runner.prefill(ids[:, :5], [5], row0=0)
    for t in range(5, 10):
        logits, _ = runner.decode(ids[:, t : t + 1])
        assert (logits[0, 0] - full[0, t]).abs().max() < 0.1 * full[0, t].abs().max()


@torch.inference_mode()
def test_bf16_decode_scores_in_fp32_over_exactly_the_valid_keys():
    """A bf16 model on CPU decodes with an fp32 bias (its scores run in fp32, `score_dtype`)
    over exactly `seq` keys, and matches the fp32 model's decoding of the same weights to bf16
    rounding, rows of different lengths included."""
    cfg = tiny_config(num_experts_per_tok=8, n_group=1, topk_group=1)
    model = random_model(cfg)
    ids = ids_for(cfg, 2, 12)

    def decode_all(m):
        r = ModelRunner(m, max_batch=2, max_seq_len=100)
        r.prefill(ids[:, :5], [5, 3], row0=0)  # rows of different lengths
        out = []
        for t in range(5, 12):
            step = r.make_step(r.cache, 0, list(r.cache.lengths[:2]), 1)
            assert step.seq == t + 1 and step.made().bias.dtype == torch.float32
            out.append(r.decode(ids[:, t : t + 1])[0].float())
        return torch.cat(out, dim=1)

    exact = decode_all(model)
    bf16 = decode_all(random_model(cfg).to(torch.bfloat16))
    torch.testing.assert_close(bf16, exact, atol=0.05 * exact.abs().max().item(), rtol=0)


def test_sequence_past_max_seq_len_is_refused():
    runner = ModelRunner(random_model(tiny_config()), max_batch=1, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        runner.make_step(runner.cache, 0, [6], 3)
