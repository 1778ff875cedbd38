"""The reasoning splitter: whole text, streamed deltas (tags split anywhere), pre-opened think."""

import random

import pytest

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.serve.reasoning import ReasoningSplitter, prompt_opens_think, split_reasoning


def stream(text: str, cuts: list[int], opened: bool) -> tuple[str, str, int]:
    """Feed `text` cut at `cuts`; returns (reasoning, content, number of non-empty parts)."""
    s = ReasoningSplitter(opened)
    bounds = [0, *cuts, len(text)]
    parts = [s.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [s.finish()]
    return (
        "".join(p.reasoning for p in parts),
        "".join(p.content for p in parts),
        sum(bool(p) for p in parts),
    )


@pytest.mark.parametrize(
    "text, opened, want",
    [
        # the template opened <think>: output starts inside the thought
        ("let me see</think>\n\nThe answer is 4.", True, ("let me see", "The answer is 4.")),
        # the model opens the thought itself
        ("<think>\nlet me see\n</think>\n\n4", False, ("let me see", "4")),
        ("  <think>x</think>y", False, ("x", "y")),
        # no thought at all
        ("The answer is 4.", False, (None, "The answer is 4.")),
        ("<b>bold</b> text", False, (None, "<b>bold</b> text")),
        ("<", False, (None, "<")),
        # no closing tag: everything is reasoning (the model ran out of tokens)
        ("still thinking about it", True, ("still thinking about it", None)),
        ("<think>still thinking", False, ("still thinking", None)),
        ("a </thin b", True, ("a </thin b", None)),
        ("ends in a partial </thi", True, ("ends in a partial </thi", None)),
        # empty thought, whitespace inside the thought kept, around it dropped
        ("</think>4", True, (None, "4")),
        ("\n a \n\n b \n</think>\n\n c \n", True, ("a \n\n b", "c \n")),
        # a second <think> after the answer started is ordinary text
        ("r</think>c <think> d", True, ("r", "c <think> d")),
        ("", True, (None, None)),
        ("", False, (None, None)),
    ],
)
def test_whole_text(text, opened, want):
    assert split_reasoning(text, opened) == want


TEXTS = [
    ("let me see</think>\n\nThe answer is 4.", True),
    ("<think>\nlet me see\n</think>\n\n4 </think> <think>", False),
    ("a </thin b </think> c", True),
    ("reasoning   \n  </think>  content  ", True),
    ("<thinking is not a tag", False),
    ("no closing tag <", True),
]


@pytest.mark.parametrize("text, opened", TEXTS)
def test_every_split_point_gives_the_whole_text_split(text, opened):
    want = tuple(x or "" for x in split_reasoning(text, opened))
    for cut in range(len(text) + 1):  # one cut anywhere, tags included
        assert stream(text, [cut], opened)[:2] == want, cut
    assert stream(text, list(range(1, len(text))), opened)[:2] == want  # char by char
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 5))))
        assert stream(text, cuts, opened)[:2] == want, cuts


def test_tags_split_across_deltas_never_leak():
    s = ReasoningSplitter(opened=True)
    out = [s.feed(x) for x in ["thinking", " hard</", "th", "ink", ">\n", "\nanswer"]]
    assert [(p.reasoning, p.content) for p in out] == [
        ("thinking", ""),
        (" hard", ""),  # "</" is held back: it may start the closing tag
        ("", ""),
        ("", ""),
        ("", ""),  # the tag closed; leading whitespace of the answer dropped
        ("", "answer"),
    ]
    assert not s.finish()


def test_opening_tag_split_across_deltas():
    s = ReasoningSplitter(opened=False)
    out = [s.feed(x) for x in ["\n<", "thi", "nk>", "r", "</think>", "c"]]
    assert "".join(p.reasoning for p in out) == "r"
    assert "".join(p.content for p in out) == "c"
    assert all("<" not in p.reasoning + p.content for p in out)


def test_trailing_reasoning_whitespace_is_held_not_lost():
    s = ReasoningSplitter(opened=True)
    assert s.feed("a ").reasoning == "a"
    assert s.feed("\n").reasoning == ""
    assert s.feed("b").reasoning == " \nb"  # it was inside the thought after all


def test_prompt_opens_think_with_the_chat_template(ckpt):
    tok = Tokenizer.load(ckpt)
    msgs = [{"role": "user", "content": "hi"}]
    assert prompt_opens_think(
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    )
    assert not prompt_opens_think(tok.apply_chat_template(msgs, tokenize=False))
    history = msgs + [{"role": "assistant", "content": "<think>x</think>y"}, *msgs]
    assert prompt_opens_think(
        tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    )
    assert not prompt_opens_think("<think>x</think>")
