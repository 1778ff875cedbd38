"""Reading a tokenizer directory: nanoseek's own, or any Hugging Face one.

What is read, and where each thing comes from (first found wins):
- the model: `tokenizer.json` (the `tokenizers` library's format; required);
- special tokens (what a chat template sees as `bos_token`, `eos_token`, ...):
  `tokenizer_config.json`, then `special_tokens_map.json`; each a string or a
  `{"content": ...}` object, or null for "none" (Qwen's bos). A directory that names none at
  all gets DeepSeek's names where its vocabulary has them (nanoseek's oldest saves);
- ids: the special tokens' ids; a model's `config.json` beside them (a checkpoint directory)
  supplies `bos_token_id` / `eos_token_id` the tokenizer does not name, and every id of an
  `eos_token_id` list is a stop id (Llama-3.1 lists three);
- added tokens: `added_tokens_decoder` of tokenizer_config.json; a token tokenizer.json lacks
  is added (as transformers adds it), one it has under another id is an error;
- the chat template: `chat_template.jinja` (transformers >= 4.43 saves it there), else the
  config's `chat_template` (a string, or transformers' list of named templates: "default").

Every problem is a ConfigError naming the file and the field. Nothing here executes code from
the directory: JSON is parsed, and the template only ever runs in Jinja's sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from jinja2.exceptions import TemplateError
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from nanoseek.config import ConfigError

if TYPE_CHECKING:  # tokenizer.py imports this module to load; the class is only named here
    from nanoseek.data.tokenizer import Tokenizer

ID_TOKENS = ("bos_token", "eos_token", "pad_token")  # those whose ids nanoseek uses
# the named special tokens transformers hands a chat template (`special_tokens_map`)
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)  # fmt: skip


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def token_string(value: object, where: str) -> str | None:
    """A special token as the config gives it: "<s>", {"content": "<s>", ...} or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"{where}: must be a token string or an object with a 'content' string")


def read_backend(d: Path) -> Backend:
    path = d / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {d}")
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust parser raises plain Exception
        why = " ".join(str(e).split())[:200]
        raise ConfigError(f"{path}: not a valid tokenizer ({why})") from None


def read_template(d: Path, config: dict | None) -> tuple[str | None, str]:
    """(the chat template or None, where it came from: for error messages)."""
    where = f"{d / 'tokenizer_config.json'}: field 'chat_template'"
    template = (config or {}).get("chat_template")
    if isinstance(template, list):  # transformers' named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = d / "chat_template.jinja"
    if jinja.is_file():  # transformers saves it here; the file then takes precedence
        where = str(jinja)
        try:
            template = jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}: not UTF-8 text ({e.reason})") from None
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{where}: must be a string, got {type(template).__name__}")
    return template, where


def read_special_tokens(
    d: Path, config: dict | None, backend: Backend, defaults: Mapping[str, str]
) -> dict[str, str | None]:
    """The named special tokens the directory declares (None where it says null); one that
    names none gets those of `defaults` its vocabulary has."""
    declared: dict[str, str | None] = {}
    sources = [(d / "tokenizer_config.json", config)]
    if (d / "special_tokens_map.json").is_file():
        sources.append((d / "special_tokens_map.json", None))
    for path, data in sources:
        data = data if data is not None else read_json_object(path)
        for name in SPECIAL_TOKEN_NAMES:
            if name in data and name not in declared:
                declared[name] = token_string(data[name], f"{path}: field '{name}'")
    if not declared:  # nothing named anywhere: DeepSeek's names, where the vocabulary has them
        known = defaults.items()
        declared = {k: v for k, v in known if backend.token_to_id(v) is not None}
    for name in ID_TOKENS:
        token = declared.get(name)
        if token is not None and backend.token_to_id(token) is None:
            raise ConfigError(
                f"{d / 'tokenizer_config.json'}: field '{name}' is {token!r}, which "
                f"{d / 'tokenizer.json'} does not have"
            )
    return declared


def add_declared_tokens(backend: Backend, config: dict | None, path: Path) -> None:
    """Make `added_tokens_decoder` true of the backend: add the tokens it lacks, in id order."""
    table = (config or {}).get("added_tokens_decoder") or {}
    where = f"{path}: field 'added_tokens_decoder'"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be an object of id -> token")
    entries = []
    for key, spec in table.items():
        try:
            i = int(key)
        except ValueError:
            raise ConfigError(f"{where}: key {key!r} is not a token id") from None
        content = token_string(spec, f"{where}: id {key}")
        if content is None:
            raise ConfigError(f"{where}: id {key} has no 'content'")
        entries.append((i, content, spec if isinstance(spec, dict) else {}))
    for i, content, spec in sorted(entries):
        have = backend.token_to_id(content)
        if have is None:
            token = AddedToken(
                content,
                single_word=bool(spec.get("single_word", False)),
                lstrip=bool(spec.get("lstrip", False)),
                rstrip=bool(spec.get("rstrip", False)),
                normalized=bool(spec.get("normalized", False)),
                special=bool(spec.get("special", True)),
            )
            if token.special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])
            have = backend.token_to_id(content)
        if have != i:
            raise ConfigError(
                f"{where}: gives {content!r} id {i}, but {path.parent / 'tokenizer.json'} "
                f"gives it id {have}"
            )


def model_token_ids(d: Path, vocab_size: int) -> tuple[int | None, list[int]]:
    """(bos_token_id, eos_token_ids) of a model config.json beside the tokenizer, if any."""
    path = d / "config.json"
    if not path.is_file():
        return None, []
    config = read_json_object(path)

    def ids(name: str) -> list[int]:
        value = config.get(name)
        values = [] if value is None else value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size:
                raise ConfigError(f"{path}: field '{name}': {v!r} is not an id below {vocab_size}")
        return values

    bos = ids("bos_token_id")
    return (bos[0] if bos else None), ids("eos_token_id")


def read_tokenizer_dir(cls: type[Tokenizer], d: Path, defaults: Mapping[str, str]) -> Tokenizer:
    """`Tokenizer.load`: see the module docstring; `defaults` are the special tokens of a
    directory that names none (DeepSeek's, for nanoseek's oldest saves)."""
    backend = read_backend(d)
    config_path = d / "tokenizer_config.json"
    config = read_json_object(config_path) if config_path.is_file() else None
    template, where = read_template(d, config)
    add_declared_tokens(backend, config, config_path)
    special = read_special_tokens(d, config, backend, defaults)
    bos_id, eos_ids = model_token_ids(d, backend.get_vocab_size(with_added_tokens=True))
    if special.get("eos_token") is None and not eos_ids:
        raise ConfigError(
            f"{config_path}: no 'eos_token' (nor an 'eos_token_id' in {d / 'config.json'}): "
            "nanoseek needs the token that ends a sequence"
        )
    if "bos_token" in special:  # the tokenizer's own word wins; a declared null stays "no bos"
        bos_id = None
    tok = cls(
        backend,
        template,
        special,
        eos_token_ids=eos_ids,
        bos_token_id=bos_id,
        config=config,
    )
    if template is not None:  # fail at load, naming the file, not at the first chat request
        try:
            tok.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        except (TemplateError, ValueError, TypeError, RecursionError) as e:
            why = " ".join(str(e).split())[:200]
            raise ConfigError(f"{where}: not a usable chat template ({why})") from None
    return tok
