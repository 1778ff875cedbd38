"""Byte-level BPE tokenizer: training, the DeepSeek-R1 chat template, HF-compatible save/load.

Byte-level [V3 §4.1] means every UTF-8 string maps to byte symbols before merging, so any text
round-trips exactly (emoji, CJK, runs of spaces and newlines) and there is no unknown token.
Digits are split one per token before BPE (DeepSeek-V3 groups up to three; single digits make
the arithmetic of R1-Zero-style tasks far easier for tiny models - `max_digits` picks).

Token strings follow DeepSeek's spelling exactly, with full-width bars (U+FF5C) and `▁` (U+2581):
ids 0, 1, 2 are bos, eos and pad, as in DeepSeek-V3 (`bos_token_id 0, eos_token_id 1`).
- control tokens (`special`: dropped by `decode(skip_special_tokens=True)`): bos, eos, pad.
- markup tokens (single ids but ordinary text on decode, as DeepSeek-R1's tokenizer marks them):
  `<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>`, and also `<answer>`, `</answer>`. Those
  two are not in DeepSeek's vocabulary; we add them because the R1-Zero template and its rewards
  are built on them [R1 §2.2]: one id each lets a tiny model learn the format quickly and lets
  the engine stop on `</answer>` by id. Decoded text still contains them, so text-level answer
  extraction works the same as with DeepSeek's own tokenizer.

Footgun: added tokens are matched inside raw text too, so a document containing the literal
string `<｜end▁of▁sentence｜>` encodes to the eos id. Harmless for our corpora; filter web text.

Saved directories hold `tokenizer.json` (the `tokenizers` model, with a post-processor that
prepends bos, so `AutoTokenizer(...)(text)` matches `encode(text, add_bos=True)`) and
`tokenizer_config.json` (token names, `chat_template`), and load as a `PreTrainedTokenizerFast`.

Any Hugging Face tokenizer directory loads too (`Tokenizer.load`, nanoseek/data/tokenizer_files.py):
its special tokens and ids come from its own files, its chat template renders exactly as
transformers renders it (nanoseek/data/chat_template.py), and replies stop on its eos and on the
template's end-of-turn token (`stop_ids`). DeepSeek's names above are only the defaults of the
tokenizers nanoseek trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from nanoseek.data.chat_template import (
    CHAT_ROLES,
    Turn,
    assistant_turn,
    first_added_token,
    render_chat,
)
from nanoseek.data.sources import read_documents
from nanoseek.data.tokenizer_files import read_tokenizer_dir
from nanoseek.fsio import atomic_dir, naming, write_bytes

__all__ = ["CHAT_ROLES", "Tokenizer", "render_chat", "train_tokenizer"]

# what a tokenizer folder may hold (ours, or transformers' save_pretrained of one)
TOKENIZER_FILES = frozenset(
    ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
)
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
CONTROL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 (the trainer assigns ids in this order)
MARKUP_TOKENS = (USER, ASSISTANT, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
N_BYTES = 256  # the byte-level alphabet: every byte is a base token, so nothing is unknown

# DeepSeek-R1 style (its released chat template): bos, the system text, then `<｜User｜>q` and
# `<｜Assistant｜>a<｜end▁of▁sentence｜>`; the generation prompt opens the think block as R1 does.
# Unlike R1's released template we keep `<think>...</think>` of earlier assistant turns: SFT
# data needs the reasoning in the target; a server drops it from history itself if it wants.
# Rendered identically by transformers and by `render_chat` (nanoseek/data/chat_template.py).
CHAT_TEMPLATE = (  # one tag a line; `-` trims the newlines between tags
    "{%- set ns = namespace(system='') -%}\n"
    "{%- for m in messages if m['role'] == 'system' -%}\n"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}\n"
    "{%- endfor -%}\n"
    "{{- bos_token + ns.system -}}\n"
    "{%- for m in messages -%}\n"
    "{%- if m['role'] == 'user' -%}\n"
    "{{- '" + USER + "' + m['content'] -}}\n"
    "{%- elif m['role'] == 'assistant' -%}\n"
    "{{- '" + ASSISTANT + "' + m['content'] + eos_token -}}\n"
    "{%- elif m['role'] != 'system' -%}\n"
    "{{- raise_exception('unknown chat role: ' + m['role']) -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '" + ASSISTANT + THINK_OPEN + "\\n' -}}\n"
    "{%- endif -%}\n"
)
DEFAULT_SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}


def default_config() -> dict:
    """tokenizer_config.json of the tokenizers nanoseek trains (without the chat template)."""
    return {
        # the generic fast class loads tokenizer.json as is (no model-specific rewrites)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        # HF's clean-up would turn " ." into "." on decode and break exact round trips
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }


class Tokenizer:
    """Our code's tokenizer: a `tokenizers.Tokenizer` plus token names and the chat template.

    `special_tokens` maps transformers' names (bos_token, eos_token, pad_token, ...) to token
    strings: what a chat template sees, and where the ids come from. None (nanoseek's own
    tokenizers) means DeepSeek's names. A tokenizer without a bos token (Qwen's) starts
    documents and raw prompts with its eos instead, the separator such corpora use; without a
    pad token, eos pads. `eos_token_ids`: further ids a reply may end with (config.json's);
    `bos_token_id`: the bos id when no bos token is named (config.json's). `config`: the
    tokenizer_config.json it was loaded from, written back by `save`."""

    def __init__(
        self,
        backend: Backend,
        chat_template: str | None = CHAT_TEMPLATE,
        special_tokens: Mapping[str, str | None] | None = None,
        *,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
        config: Mapping | None = None,
    ):
        self.backend = backend
        self.chat_template = chat_template
        given = DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens
        self.special_tokens = {k: v for k, v in given.items() if v is not None}
        self.config = dict(config) if config is not None else None
        eos = self.special_tokens.get("eos_token")
        if eos is None and not eos_token_ids:
            raise ValueError("tokenizer has no eos token")
        self.eos_id = self._id(eos) if eos is not None else int(eos_token_ids[0])
        bos, pad = self.special_tokens.get("bos_token"), self.special_tokens.get("pad_token")
        self.bos_id = (
            self._id(bos) if bos is not None else bos_token_id if bos_token_id is not None
            else self.eos_id
        )  # fmt: skip
        self.pad_id = self._id(pad) if pad is not None else self.eos_id
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)

    def _id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no token {token!r}")
        return i

    # ------------------------------------------------------------------ ids <-> text
    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens: the lower bound for a model's `vocab_size`."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        return self._id(token)

    @cached_property
    def added_tokens(self) -> tuple[str, ...]:
        """The strings of every added token (control, markup, the template's turn markers)."""
        return tuple(t.content for t in self.backend.get_added_tokens_decoder().values())

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> ids. Unlike HF's default, bos is only added when asked for."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, the [start, end) character span of `text` each id came from)."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once, without bos/eos; runs on all cores inside `tokenizers`."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def render(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
    ) -> str:
        """The chat template's text for `messages`, exactly as transformers renders it."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Render `messages` (dicts with role/content) and return ids, or the text if
        `tokenize=False`. The template writes bos itself when it wants one; none is added."""
        text = self.render(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def chat_turn(self, messages: Sequence[Mapping[str, str]]) -> Turn:
        """How the template renders the assistant's reply to `messages` (header, turn end,
        generation prompt; see `chat_template.Turn`)."""
        return assistant_turn(self.render, messages)

    @cached_property
    def end_of_turn_id(self) -> int | None:
        """The first added token after an assistant reply (`<|im_end|>`, `<|eot_id|>`, our
        eos), where generation stops; None without a template or such a token."""
        if self.chat_template is None:
            return None
        try:
            turn = self.chat_turn([{"role": "user", "content": "hi"}])
        except ValueError:
            return None
        hit = first_added_token(turn.turn_end, self.added_tokens)
        return None if hit is None else self._id(hit[1])

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id a reply ends on: eos, config.json's eos ids, the template's end of turn."""
        ids = [self.eos_id, *self.eos_token_ids]
        if self.end_of_turn_id is not None:
            ids.append(self.end_of_turn_id)
        return tuple(dict.fromkeys(ids))

    @cached_property
    def fingerprint(self) -> str:
        """Hash of everything that decides text -> ids (model, added tokens, pre-tokenizer,
        normaliser), not of the library version's JSON layout; shards record it."""
        spec = json.loads(self.backend.to_str())
        key = {
            "model": spec.get("model"),
            "added": [(a["id"], a["content"], a["special"]) for a in spec.get("added_tokens", [])],
            "pre_tokenizer": spec.get("pre_tokenizer"),
            "normalizer": spec.get("normalizer"),
        }
        blob = json.dumps(key, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ------------------------------------------------------------------ files
    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` (loadable by AutoTokenizer):
        nanoseek's config for its own tokenizers, the loaded one (its special tokens and
        template in it) for others.

        Atomic: a folder holding only tokenizer files (or none yet) is replaced as a whole, so a
        kill never leaves a tokenizer.json of one tokenizer beside the config of another; in a
        folder holding anything else each file is replaced on its own. Files already holding
        these bytes are not rewritten (a resumed run keeps its tokenizer untouched)."""
        out = Path(out_dir)
        config = default_config() if self.config is None else dict(self.config)
        for name, token in self.special_tokens.items():  # from special_tokens_map.json, say
            config.setdefault(name, token)
        config.pop("chat_template", None)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        files = {
            "tokenizer.json": self.backend.to_str(pretty=True).encode("utf-8"),
            "tokenizer_config.json": (
                json.dumps(config, indent=2, ensure_ascii=False) + "\n"
            ).encode("utf-8"),
        }
        others = set(os.listdir(out)) - TOKENIZER_FILES if out.is_dir() else set()
        if not others:
            with atomic_dir(out, keep_if_same=True) as tmp:
                for name, data in files.items():
                    with naming(os.path.join(out, name)), open(os.path.join(tmp, name), "wb") as f:
                        f.write(data)
            return out
        for name, data in files.items():
            path = out / name
            if not (path.is_file() and path.read_bytes() == data):
                write_bytes(path, data)
        # files from an earlier transformers save would override the ones just written
        (out / "chat_template.jinja").unlink(missing_ok=True)
        (out / "special_tokens_map.json").unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer directory: nanoseek's, or any Hugging Face one (`tokenizer.json`,
        `tokenizer_config.json`, optionally `chat_template.jinja`, `special_tokens_map.json`
        and a model's `config.json`); see `tokenizer_files.read_tokenizer_dir`. A file that
        does not parse, a special token the vocabulary lacks, or a chat template that does not
        compile and render a one-message chat, is a ConfigError naming the file and field."""
        return read_tokenizer_dir(cls, Path(path), DEFAULT_SPECIAL_TOKENS)


def _build_backend(max_digits: int) -> Backend:
    tok = Backend(models.BPE())
    # no normaliser: NFC or lower-casing would break exact byte round trips
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(rf"\p{{N}}{{1,{max_digits}}}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _texts(files_or_texts: Iterable[str | os.PathLike]) -> Iterator[str]:
    if isinstance(files_or_texts, (str, os.PathLike)):  # one item, not an iterable of chars
        files_or_texts = [files_or_texts]
    for item in files_or_texts:
        if isinstance(item, os.PathLike):
            yield from read_documents(item)
        else:
            yield item


def train_tokenizer(
    files_or_texts: Iterable[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    *,
    max_digits: int = 1,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE of at most `vocab_size` ids (control and markup tokens included)
    and save it to `out_dir` when given.

    Items of `files_or_texts` that are `pathlib.Path` (any `os.PathLike`) are corpus files read
    with `sources.read_documents` (.txt/.jsonl/.parquet); plain `str` items are *texts*, never
    paths - wrap a path string in `Path(...)`. The result can have fewer ids than asked for when
    the corpus runs out of pairs seen `min_frequency` times; it never has more.
    """
    n_added = len(CONTROL_TOKENS) + len(MARKUP_TOKENS)
    if vocab_size < N_BYTES + n_added:
        raise ValueError(f"vocab_size must be >= {N_BYTES + n_added} (bytes + added tokens)")
    if max_digits < 1:
        raise ValueError("max_digits must be >= 1")
    backend = _build_backend(max_digits)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        # the trainer gives added tokens the first ids in this order: bos 0, eos 1, pad 2
        special_tokens=[
            AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS + MARKUP_TOKENS
        ],
        # all 256 bytes from the start, even those the corpus lacks: no text is unencodable
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_texts(files_or_texts), trainer=trainer)
    # the trainer marks every added token special; markup tokens must survive decoding with
    # skip_special_tokens=True, so rewrite their flag (DeepSeek-R1's tokenizer does the same)
    spec = json.loads(backend.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] in CONTROL_TOKENS
    backend = Backend.from_str(json.dumps(spec, ensure_ascii=False))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, backend.token_to_id(BOS))],
    )
    tok = Tokenizer(backend)
    assert tok.vocab_size <= vocab_size, (tok.vocab_size, vocab_size)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    if out_dir is not None:
        tok.save(out_dir)
    return tok
