"""Any Hugging Face tokenizer directory: special tokens, ids and chat templates exactly as
transformers reads and renders them (ChatML, Llama-3, DeepSeek-R1's released template, one
using transformers' globals), stop ids, load errors, save round trips."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping

import pytest

from nanoseek.config import ConfigError
from nanoseek.data.chat_template import SENTINEL, render_chat
from nanoseek.data.tokenizer import Tokenizer
from tests.hf_tokenizers import KINDS, build

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "what is 2+3?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " what is 2+3? "},
        {"role": "assistant", "content": "<think>\nadd</think> 5"},
        {"role": "user", "content": "and 7 plus 8\n"},
    ],
    [
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat on a mat"},
        {"role": "user", "content": "ünïcødé 😀 and\n\nnewlines"},
        {"role": "assistant", "content": "so 15"},
    ],
]


@pytest.fixture(scope="module", params=sorted(KINDS))
def pair(request, tmp_path_factory):
    d = build(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, d, Tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(str(d))


def hf_ids(out) -> list[int]:
    return list(out["input_ids"]) if isinstance(out, Mapping) else list(out)


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_rendering_and_ids_match_transformers(pair, conv, gen):
    _, _, tok, hf = pair
    msgs = CONVERSATIONS[conv]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    assert ours == hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    theirs = hf_ids(hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True))
    assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == theirs


def test_special_tokens_and_ids_match_transformers(pair):
    kind, _, tok, hf = pair
    assert tok.eos_id == hf.eos_token_id and tok.bos_id == hf.bos_token_id
    assert tok.vocab_size == len(hf)  # the declared-only <|extra_0|> was added by both
    text = "x <|extra_0|> y" + KINDS[kind].end_of_turn
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.special_tokens == hf.special_tokens_map


def test_stop_ids_hold_eos_and_the_templates_end_of_turn(pair):
    kind, _, tok, _ = pair
    eot = tok.token_to_id(KINDS[kind].end_of_turn)
    assert tok.end_of_turn_id == eot
    assert tok.stop_ids[0] == tok.eos_id and eot in tok.stop_ids


def test_reply_structure_is_read_off_the_template(pair):
    kind, _, tok, _ = pair
    turn = tok.chat_turn(CONVERSATIONS[0])
    expected = {
        "chatml": ("<|im_start|>assistant\n", "<|im_end|>\n", ""),
        "llama3": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", ""),
        "r1": ("<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<think>\n"),
        "features": ("ASSISTANT: ", "</s>", ""),
    }[kind]
    assert (turn.header, turn.turn_end, turn.opened) == expected


def test_save_round_trip_keeps_tokens_and_template(pair, tmp_path):
    kind, _, tok, hf = pair
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.special_tokens == tok.special_tokens and again.stop_ids == tok.stop_ids
    assert again.fingerprint == tok.fingerprint
    hf2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = CONVERSATIONS[1]
    assert hf2.apply_chat_template(msgs, tokenize=False) == again.render(msgs)
    assert again.render(msgs) == hf.apply_chat_template(msgs, tokenize=False)


# ------------------------------------------------------------------------------ globals, sandbox
def test_raise_exception_and_globals_behave_as_in_transformers(tmp_path):
    d = build("chatml", tmp_path / "t")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}"
    )
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = Tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(str(d))
    msgs = [{"role": "user", "content": "a<b>&"}]
    assert tok.render(msgs) == hf.apply_chat_template(msgs, tokenize=False) == '<s>a<b>&1{"a": 1}'
    bad = [{"role": "system", "content": "s"}, *msgs]
    with pytest.raises(ValueError, match="no system role"):
        tok.render(bad)
    with pytest.raises(Exception, match="no system role"):
        hf.apply_chat_template(bad, tokenize=False)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the classic sandbox escape
        "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}",
        "{{ messages.append(1) }}",  # the immutable sandbox: inputs cannot be changed
    ],
)
def test_templates_cannot_escape_the_sandbox(tmp_path, template):
    d = build("chatml", tmp_path / "t")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="tokenizer_config.json: field 'chat_template'"):
        Tokenizer.load(d)


def test_sentinel_is_rendered_verbatim_by_trimming_templates():
    out = render_chat(
        "{% for m in messages %}{{ m['content'] | trim }}{% endfor %}",
        [{"role": "assistant", "content": f"  {SENTINEL} \n"}],
    )
    assert out == SENTINEL


# ------------------------------------------------------------------------------ load errors, ids
def edit_config(d, **fields):
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(fields)
    (d / "tokenizer_config.json").write_text(json.dumps(config))


def test_a_special_token_missing_from_the_vocabulary_names_the_field(tmp_path):
    d = build("llama3", tmp_path / "t")
    edit_config(d, eos_token="<|nope|>")
    with pytest.raises(ConfigError, match="field 'eos_token' is '<\\|nope\\|>'"):
        Tokenizer.load(d)


def test_added_tokens_decoder_disagreeing_with_tokenizer_json_is_an_error(tmp_path):
    d = build("llama3", tmp_path / "t", declare_extra=False)
    edit_config(d, added_tokens_decoder={"5": {"content": "<|eot_id|>", "special": True}})
    with pytest.raises(ConfigError, match="added_tokens_decoder'.*'<\\|eot_id\\|>' id 5"):
        Tokenizer.load(d)


def test_ids_from_a_models_config_json(tmp_path):
    """Qwen-style: no bos token (null), the model's config.json names bos and several eos."""
    d = build("chatml", tmp_path / "t", declare_extra=False)
    edit_config(d, bos_token=None, chat_template=KINDS["chatml"].template.replace(
        "{{ bos_token }}", ""))  # fmt: skip
    tok = Tokenizer.load(d)
    assert "bos_token" not in tok.special_tokens and tok.bos_id == tok.eos_id  # eos starts docs
    im_end = tok.token_to_id("<|im_end|>")
    (d / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, im_end]}))
    tok = Tokenizer.load(d)
    assert tok.bos_id == tok.eos_id  # a declared null bos is not overridden
    assert tok.stop_ids == (1, im_end) and "bos_token" not in tok.special_tokens
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert tok.render(CONVERSATIONS[1]) == hf.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    # no eos named anywhere: config.json's eos_token_id is the eos
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["eos_token"], config["bos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(d)
    assert (tok.eos_id, tok.bos_id) == (1, 2)
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="no 'eos_token'"):
        Tokenizer.load(d)


def test_special_tokens_map_json_supplies_tokens_the_config_lacks(tmp_path):
    d = build("llama3", tmp_path / "t")
    config = json.loads((d / "tokenizer_config.json").read_text())
    tokens = {k: config.pop(k) for k in ("bos_token", "eos_token")}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(json.dumps(tokens))
    tok = Tokenizer.load(d)
    assert tok.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    out = tmp_path / "saved"
    shutil.copytree(d, out)
    tok.save(out)  # the saved config names them itself; the stale map is removed
    assert not (out / "special_tokens_map.json").exists()
    assert Tokenizer.load(out).special_tokens == tok.special_tokens
