"""nanoseek.generate: shapes, padding after eos, list prompts, log-probs, a reused engine."""

import pytest
import torch

import nanoseek
from nanoseek.infer import Engine
from tests.helpers import random_model, tiny_config


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config())


def recompute_greedy(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat((ids, model(ids, mtp=False).logits[:, -1:].argmax(-1)), dim=1)
    return ids


def test_returns_the_new_tokens_of_a_batch(model):
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    out = nanoseek.generate(model, ids, max_new_tokens=10)
    assert out.shape == (2, 10) and out.dtype == torch.long
    assert torch.equal(out, recompute_greedy(model, ids, 10)[:, 5:])


def test_list_prompts_of_different_lengths(model):
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    out = nanoseek.generate(model, prompts, max_new_tokens=6)
    for b, p in enumerate(prompts):
        assert (
            out[b].tolist() == recompute_greedy(model, torch.tensor([p]), 6)[0, len(p) :].tolist()
        )


def test_rows_stop_at_eos_and_are_padded(model):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    full = nanoseek.generate(model, ids, max_new_tokens=12)
    eos = full[0, 3].item()
    out = nanoseek.generate(
        model, ids, max_new_tokens=12, ignore_eos=False, eos_token_id=eos, pad_token_id=-1
    )
    for b in range(2):
        row = full[b].tolist()
        n = row.index(eos) + 1 if eos in row else 12
        assert out[b, :n].tolist() == row[:n]
        assert (out[b, n:] == -1).all()
    assert out.shape[1] == max((r.index(eos) + 1 if eos in r else 12) for r in full.tolist())


def test_seeded_sampling_and_logprobs(model):
    ids = torch.tensor([[5, 6, 7]])
    a, lp = nanoseek.generate(
        model, ids, max_new_tokens=8, temperature=1.0, top_k=10, seed=4, return_logprobs=True
    )
    b = nanoseek.generate(model, ids, max_new_tokens=8, temperature=1.0, top_k=10, seed=4)
    assert torch.equal(a, b) and lp.shape == (1, 8) and (lp <= 0).all()


def test_a_reused_engine_gives_the_same_tokens(model):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    want = nanoseek.generate(model, ids, max_new_tokens=8)
    for _ in range(2):
        assert torch.equal(nanoseek.generate(model, ids, max_new_tokens=8, engine=engine), want)


def test_bad_input_shape(model):
    with pytest.raises(ValueError, match="input_ids"):
        nanoseek.generate(model, torch.tensor([1, 2, 3]), max_new_tokens=2)
