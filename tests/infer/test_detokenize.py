"""Incremental detokenisation: multi-token characters, stop strings across tokens."""

import pytest

from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.infer.detokenize import Detokenizer

TEXTS = ["the cat sat on the mat", "Answer: 42 <think>x</think>", "héllo wörld, ça va?"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


def run(tok, text, stop=()):
    d = Detokenizer(tok, stop)
    pieces = [d.add(i) for i in tok.encode(text)]
    pieces.append(d.flush())
    return pieces, d


@pytest.mark.parametrize("text", ["plain ascii text", "emoji 🙂 and 中文 glyphs", "a\n\n  b\t"])
def test_pieces_add_up_to_the_decoded_text(tok, text):
    pieces, _ = run(tok, text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_multi_byte_character_waits_for_its_last_token(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1  # byte tokens: the emoji spans several ids
    d = Detokenizer(tok)
    assert [d.add(i) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


@pytest.mark.parametrize(
    "text, stop, want",
    [
        ("the cat sat on the mat", ["sat"], "the cat "),
        ("the cat sat on the mat", ["mat", "on"], "the cat sat "),  # the earliest stop wins
        ("the cat sat on the mat", ["dog"], "the cat sat on the mat"),
        ("Answer: 42 <think>x</think>", ["</think>"], "Answer: 42 <think>x"),
    ],
)
def test_stop_strings_cut_the_text_and_never_stream_part_of_one(tok, text, stop, want):
    pieces, d = run(tok, text, stop)
    assert "".join(pieces) == want
    streamed = ""
    for p in pieces:
        streamed += p
        assert all(s not in streamed for s in stop)
    assert d.stopped == (
        None if want == text else min((text.find(s), s) for s in stop if s in text)[1]
    )


def test_held_back_prefix_is_released_when_the_stop_does_not_follow(tok):
    d = Detokenizer(tok, ["sat!"])
    out = "".join(d.add(i) for i in tok.encode("the cat sat on"))
    out += d.flush()
    assert out == "the cat sat on" and d.stopped is None


def test_special_tokens_are_skipped(tok):
    d = Detokenizer(tok)
    text = "".join(d.add(i) for i in [tok.bos_id, *tok.encode("hi"), tok.eos_id]) + d.flush()
    assert text == "hi"
