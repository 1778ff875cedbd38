"""Byte-level BPE: exact round trips, single-id special tokens, HF AutoTokenizer parity and the
DeepSeek-R1 chat template rendered identically by our wrapper and by transformers."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path

import pytest

from nanoseek.data.tokenizer import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    ASSISTANT,
    BOS,
    CONTROL_TOKENS,
    EOS,
    MARKUP_TOKENS,
    PAD,
    THINK_CLOSE,
    THINK_OPEN,
    USER,
    Tokenizer,
    train_tokenizer,
)

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
VOCAB = 512

TRICKY = [
    "",
    "plain ascii",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "CJK 中文字符 日本語のテキスト 한국어",
    "   leading, inner     runs and trailing   ",
    "\n\n\nnewlines\n\r\n\ttabs\t\t and \x00 nul \x7f",
    "combining e\u0301 vs \u00e9, zero width\u200bspace, rtl \u05e9\u05dc\u05d5\u05dd",
    "digits 1234567890 and 3.14159 and -42",
    f"inline {THINK_OPEN}reasoning{THINK_CLOSE}{ANSWER_OPEN}42{ANSWER_CLOSE}{EOS}",
]


def corpus_text(n_chars: int = 200_000) -> str:
    """A slice of tinyshakespeare when shared/ is beside the repo, generated text otherwise."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:n_chars]
    rng = random.Random(0)
    words = ["the", "king", "shall", "speak", "to", "my", "lord", "and", "thou", "art", "42"]
    return "\n".join(" ".join(rng.choices(words, k=12)) for _ in range(n_chars // 60))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    text = corpus_text()
    train_tokenizer(text.split("\n\n"), VOCAB, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def hf_ids(out) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list or a BatchEncoding by version."""
    return list(out["input_ids"]) if isinstance(out, Mapping) else list(out)


def test_vocab_size_and_fixed_ids(tok):
    assert tok.vocab_size <= VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)  # DeepSeek-V3's bos/eos/pad ids


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == BOS + text + EOS


def test_round_trip_random_unicode(tok):
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x20, 0x2FFF) if not 0xD800 <= c < 0xE000]
    alphabet += ["\n", "\t", " ", "😀", "🙂", "\U0001f9ea", "\U0010fff0"]
    for _ in range(50):
        text = "".join(rng.choices(alphabet, k=rng.randint(1, 200)))
        assert tok.decode(tok.encode(text)) == text


def test_special_and_markup_tokens_are_single_ids(tok):
    ids = {t: tok.token_to_id(t) for t in CONTROL_TOKENS + MARKUP_TOKENS}
    assert len(set(ids.values())) == len(ids)
    for t, i in ids.items():
        assert tok.encode(t) == [i]
        assert i in tok.encode(f"x {t} y")
    assert set(CONTROL_TOKENS) == {BOS, EOS, PAD}
    assert {USER, ASSISTANT, THINK_OPEN, THINK_CLOSE} <= set(MARKUP_TOKENS)


def test_skip_special_tokens_drops_control_keeps_markup(tok):
    text = f"{USER}hi{ASSISTANT}{THINK_OPEN}x{THINK_CLOSE}y"
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_too_small_vocab_raises():
    with pytest.raises(ValueError, match="vocab_size must be >="):
        train_tokenizer(["abc"], 100)


def test_trains_from_files_like_from_texts(tmp_path):
    texts = corpus_text(30_000).split("\n\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))
    a = train_tokenizer([jsonl], 300)
    b = train_tokenizer([t for t in texts if t.strip()], 300)
    assert a.fingerprint == b.fingerprint
    one = "\n\n".join(texts)
    assert train_tokenizer(one, 300).fingerprint == train_tokenizer([one], 300).fingerprint


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint == tok.fingerprint
    assert again.chat_template == tok.chat_template
    for text in TRICKY:
        assert again.encode(text) == tok.encode(text)


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


# --------------------------------------------------------------------- transformers parity
def test_auto_tokenizer_loads_fast_tokenizer(hf, tok):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(hf, PreTrainedTokenizerFast)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == tok.vocab_size


@pytest.mark.parametrize("text", TRICKY)
def test_auto_tokenizer_encodes_and_decodes_identically(hf, tok, text):
    assert hf(text)["input_ids"] == tok.encode(text, add_bos=True)  # HF adds bos by default
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    ids = tok.encode(text, add_bos=True)
    assert hf.decode(ids) == tok.decode(ids)
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": f"{THINK_OPEN}\nadd\n{THINK_CLOSE}\n4"},
    {"role": "user", "content": "And 3+3? 😀"},
]


def test_chat_template_renders_as_specified(tok):
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == (
        f"{BOS}You are terse.{USER}What is 2+2?{ASSISTANT}{THINK_OPEN}\nadd\n{THINK_CLOSE}\n4{EOS}"
        f"{USER}And 3+3? 😀{ASSISTANT}{THINK_OPEN}\n"
    )
    bare = tok.apply_chat_template(CHAT[1:2], tokenize=False)
    assert bare == f"{BOS}{USER}What is 2+2?"
    two_systems = [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}]
    assert tok.apply_chat_template(two_systems, tokenize=False) == f"{BOS}A\n\nB"


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_chat_template_matches_transformers(hf, tok, gen, n):
    msgs = CHAT[:n]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    assert hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False) == ours
    theirs = hf_ids(hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True))
    assert theirs == tok.apply_chat_template(msgs, add_generation_prompt=gen)
    assert theirs.count(tok.bos_id) == 1  # the template's bos, not a second one from encoding


def test_chat_generation_prompt_ends_with_open_think(tok):
    ids = tok.apply_chat_template(CHAT[1:2], add_generation_prompt=True)
    tail = [tok.token_to_id(ASSISTANT), tok.token_to_id(THINK_OPEN)] + tok.encode("\n")
    assert ids[-3:] == tail


def test_chat_template_rejects_bad_messages(hf, tok):
    bad = [{"role": "robot", "content": "beep"}]
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template(bad)
    with pytest.raises(Exception, match="unknown chat role"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="content"):
        tok.apply_chat_template([{"role": "user", "content": None}])


def test_hf_saved_directory_loads_in_wrapper(hf, tok, tmp_path):
    hf.save_pretrained(tmp_path)  # may move the template into chat_template.jinja
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint == tok.fingerprint
    assert again.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(
        CHAT, tokenize=False
    )
    (tmp_path / "chat_template.jinja").write_text("stale")
    Tokenizer(again.backend, "{{ bos_token }}fresh").save(tmp_path)
    assert Tokenizer.load(tmp_path).apply_chat_template([], tokenize=False) == f"{BOS}fresh"
