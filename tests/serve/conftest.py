"""A tiny random checkpoint with a tiny trained tokenizer (R1 chat template), for tests/serve."""

import pytest

import nanoseek
from nanoseek.data.tokenizer import train_tokenizer
from tests.helpers import random_model, tiny_config

TEXTS = [
    "the cat sat on the mat",
    "two plus two is four",
    "<think>let me think</think> the answer is 4",
] * 20
VOCAB = 300


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("serve_tok")
    train_tokenizer(TEXTS, VOCAB, tok_dir)
    path = tmp_path_factory.mktemp("serve_ckpt") / "tiny-r1"
    extra = [tok_dir / "tokenizer.json", tok_dir / "tokenizer_config.json"]
    nanoseek.save(random_model(tiny_config(vocab_size=VOCAB)), path, extra_files=extra)
    return path
