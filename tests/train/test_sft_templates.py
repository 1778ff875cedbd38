"""SFT labels on tokenizers nanoseek did not make: the reply span of every assistant message is
read off the chat template (ChatML, Llama-3, DeepSeek-R1's released template, plain-text
markers), and covers the reply and its end-of-turn token only."""

from __future__ import annotations

import pytest

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.train.sft_data import SFTDataError, encode_chat
from tests.hf_tokenizers import KINDS, build

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "what is 2+3?"},
    {"role": "assistant", "content": "<think>\nadd</think> 5"},
    {"role": "user", "content": "and 7 plus 8"},
    {"role": "assistant", "content": "15"},
]
# what each template makes of the two replies (R1's drops the reasoning of a reply, as released)
REPLIES = {
    "chatml": ["<think>\nadd</think> 5<|im_end|>", "15<|im_end|>"],
    "llama3": ["<think>\nadd</think> 5<|eot_id|>", "15<|eot_id|>"],
    "r1": [" 5<｜end▁of▁sentence｜>", "15<｜end▁of▁sentence｜>"],
    "features": ["<think>\nadd</think> 5</s>", "15</s>"],
}


def labelled_spans(tok, ids, labels):
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


@pytest.fixture(scope="module", params=sorted(KINDS))
def kind_tok(request, tmp_path_factory):
    d = build(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, Tokenizer.load(d)


def test_labels_cover_each_reply_and_its_end_of_turn(kind_tok):
    kind, tok = kind_tok
    ex = encode_chat(tok, CONV, "f:1")
    assert ex.ids == tok.apply_chat_template(CONV)  # exactly the template's tokens
    assert labelled_spans(tok, ex.ids, ex.labels) == REPLIES[kind]
    # the prompt before the first target is the template's generation prompt, less what it
    # already wrote of the reply (R1's "<think>\n"): the first target is what a model writes
    # (the "features" template's generation prompt is not the header it renders replies with)
    if kind != "features":
        prompt = tok.apply_chat_template(CONV[:2], add_generation_prompt=True)
        opened = tok.chat_turn(CONV[:2]).opened
        assert ex.ids[: ex.prompt_len] == prompt[: len(prompt) - len(tok.encode(opened))]


def test_a_template_that_rewrites_earlier_turns_is_refused(kind_tok):
    kind, tok = kind_tok
    late_system = [CONV[1], CONV[2], {"role": "system", "content": "late"}]
    if kind in ("chatml", "llama3", "features"):  # these render a late system turn in place
        encode_chat(tok, late_system, "f:3")
        return
    with pytest.raises(SFTDataError, match="f:3: message 2 changes the text rendered before"):
        encode_chat(tok, late_system, "f:3")
