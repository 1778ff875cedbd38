"""Greedy tokens equal transformers' DeepseekV3ForCausalLM.generate on the same checkpoint."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3ForCausalLM  # noqa: E402

import nanoseek  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402
from tests.helpers import random_model, tiny_config  # noqa: E402

N = 16


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same random fp32 checkpoint in both libraries (transformers ignores the MTP layer)."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = tmp_path_factory.mktemp("ckpt")
    nanoseek.save(random_model(tiny_config()), path)
    theirs = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # never stop at eos (our ignore_eos); `min_new_tokens` would instead mask eos's logit
    theirs.generation_config.eos_token_id = None
    ours = nanoseek.load(path, dtype=torch.float32)
    yield ours, theirs
    transformers.logging.set_verbosity(level)
    transformers.logging.enable_progress_bar()


def hf_greedy(model, ids, mask):
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=2,
        )  # fmt: skip
    return out[:, ids.shape[1] :]


def test_greedy_equals_transformers_generate(pair):
    ours, theirs = pair
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    want = hf_greedy(theirs, ids, torch.ones_like(ids))
    got = nanoseek.generate(ours, ids, max_new_tokens=N)
    assert torch.equal(got, want)
    spec = nanoseek.generate(ours, ids, max_new_tokens=N, speculative="mtp", num_draft=2)
    assert torch.equal(spec, want)


def test_different_lengths_equal_transformers_left_padded(pair):
    ours, theirs = pair
    prompts = [[5, 17, 33, 4, 80, 12, 9], [44, 3], [60, 61, 62, 63]]
    T = max(map(len, prompts))
    ids = torch.tensor([[2] * (T - len(p)) + p for p in prompts])  # transformers: left padding
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    want = hf_greedy(theirs, ids, mask)
    engine = Engine(ours, max_batch_size=3, max_seq_len=64)
    got = engine.generate(prompts, SamplingParams(max_new_tokens=N, ignore_eos=True))
    assert [c.token_ids for c in got] == want.tolist()
