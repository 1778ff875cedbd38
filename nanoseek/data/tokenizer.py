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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property, lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from nanoseek.data.sources import read_documents

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
# Rendered identically by transformers and by `render_chat` below (same Jinja options).
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
CHAT_ROLES = ("system", "user", "assistant")


def _raise_exception(message: str):
    # transformers exposes the same helper to templates; ours must too or rendering differs
    raise ValueError(message)


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, str]],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = False,
) -> str:
    """Render a chat template the way transformers does (sandboxed Jinja, trim/lstrip blocks)."""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in CHAT_ROLES:
            raise ValueError(f"message {i}: needs role in {CHAT_ROLES}, got {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")
    return _compile(template).render(
        messages=[dict(m) for m in messages],
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
    )


class Tokenizer:
    """Our code's tokenizer: a `tokenizers.Tokenizer` plus token names and the chat template."""

    def __init__(self, backend: Backend, chat_template: str | None = CHAT_TEMPLATE):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_id, self.eos_id, self.pad_id = (self._id(t) for t in CONTROL_TOKENS)

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

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> ids. Unlike HF's default, bos is only added when asked for."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once, without bos/eos; runs on all cores inside `tokenizers`."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Render `messages` (dicts with role/content) and return ids, or the text if
        `tokenize=False`. The rendered text already starts with bos, so none is added."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        text = render_chat(
            self.chat_template,
            messages,
            bos_token=BOS,
            eos_token=EOS,
            add_generation_prompt=add_generation_prompt,
        )
        return self.encode(text) if tokenize else text

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
        """Write `tokenizer.json` and `tokenizer_config.json` (loadable by AutoTokenizer).

        Atomic: a folder holding only tokenizer files (or none yet) is replaced as a whole, so a
        kill never leaves a tokenizer.json of one tokenizer beside the config of another; in a
        folder holding anything else each file is replaced on its own. Files already holding
        these bytes are not rewritten (a resumed run keeps its tokenizer untouched)."""
        from nanoseek.fsio import atomic_dir, naming, write_bytes

        out = Path(out_dir)
        config = {
            # the generic fast class loads tokenizer.json as is (no model-specific rewrites)
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            # HF's clean-up would turn " ." into "." on decode and break exact round trips
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
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
        # a template file from an earlier transformers save would override the one just written
        (out / "chat_template.jinja").unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a directory saved by `save` (or by transformers with the same token names).
        A file that does not parse, or a chat template that does not compile and render a
        one-message chat, is a ConfigError naming the file (and the field)."""
        from nanoseek.config import ConfigError

        d = Path(path)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d}")
        try:
            backend = Backend.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the Rust parser raises plain Exception
            why = " ".join(str(e).split())[:200]
            raise ConfigError(f"{d / 'tokenizer.json'}: not a valid tokenizer ({why})") from None
        template = None
        config_path = d / "tokenizer_config.json"
        where = f"{config_path}: field 'chat_template'"
        if config_path.is_file():
            config = _read_json_object(config_path)
            template = config.get("chat_template")
            if isinstance(template, list):  # transformers' named templates: use "default"
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
        # transformers >= 4.43 may save the template as its own file, which then takes precedence
        if (d / "chat_template.jinja").is_file():
            where = str(d / "chat_template.jinja")
            try:
                template = (d / "chat_template.jinja").read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{where}: not UTF-8 text ({e.reason})") from None
        if template is not None:
            _check_template(template, where)
        return cls(backend, template)


def _read_json_object(path: Path) -> dict:
    from nanoseek.config import ConfigError

    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _check_template(template: object, where: str) -> None:
    """Fail at load, naming the file and field, rather than at the first chat request."""
    from jinja2.exceptions import TemplateError

    from nanoseek.config import ConfigError

    if not isinstance(template, str):
        raise ConfigError(f"{where}: must be a string, got {type(template).__name__}")
    try:
        render_chat(template, [{"role": "user", "content": "hi"}], bos_token=BOS, eos_token=EOS,
                    add_generation_prompt=True)  # fmt: skip
    except (TemplateError, ValueError, TypeError, RecursionError) as e:
        why = " ".join(str(e).split())[:200]
        raise ConfigError(f"{where}: not a usable chat template ({why})") from None


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
