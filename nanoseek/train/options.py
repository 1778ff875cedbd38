"""Run options: a dataclass filled from a TOML/JSON file and `--key=value` overrides.

One place maps command-line text onto typed dataclass fields, so the CLI never carries its own
defaults: the dataclass defaults are the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from typing import Any, TypeVar

from nanoseek.config import ConfigError

T = TypeVar("T")


def _coerce(name: str, text: Any, annotation: Any) -> Any:
    """Convert `text` (a string from the command line, or a parsed TOML/JSON value) to the
    field's type; raise ConfigError naming the field when it does not fit."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if text is None or (isinstance(text, str) and text.lower() in ("none", "null")):
            return None
        return _coerce(name, text, args[0])
    if origin is list:
        if isinstance(text, str):
            text = [t for t in text.split(",") if t]
        return [_coerce(name, t, args[0] if args else str) for t in text]
    if origin is dict:
        if isinstance(text, str):
            try:
                text = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(
                    f"option '{name}': expected a JSON object, got {text!r}"
                ) from None
        return dict(text)
    try:
        if annotation is bool:
            if isinstance(text, bool):
                return text
            if str(text).lower() in ("1", "true", "yes", "on"):
                return True
            if str(text).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            if isinstance(text, float) and not text.is_integer():
                raise ValueError
            return int(float(text)) if isinstance(text, str) and "e" in text.lower() else int(text)
        if annotation is float:
            return float(text)
        if annotation is str:
            return str(text)
    except (TypeError, ValueError):
        raise ConfigError(
            f"option '{name}': {text!r} is not a valid {getattr(annotation, '__name__', annotation)}"
        ) from None
    return text


def read_file(path: str) -> dict[str, Any]:
    """A TOML or JSON file of options (flat keys; TOML tables are flattened with dots)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such config file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
        else:
            # optional: tomli, Python 3.10's TOML reader (tomllib, the same from 3.11 on); only a
            # TOML file needs either
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(raw.decode())
    except Exception as e:  # noqa: BLE001 - any parse error becomes a message naming the file
        raise ConfigError(f"{path}: cannot parse ({e})") from None
    return data


def build(cls: type[T], file: str | None = None, overrides: list[str] | None = None, **values) -> T:
    """cls(**file values, then `key=value` overrides, then keyword values)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    merged: dict[str, Any] = {}
    if file:
        merged.update(read_file(file))
    for item in overrides or []:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --key=value")
        merged[key.replace("-", "_")] = value
    merged.update({k: v for k, v in values.items() if v is not None})
    kwargs = {}
    for key, value in merged.items():
        if key not in fields:
            close = [n for n in fields if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown option '{key}'{hint}")
        kwargs[key] = _coerce(key, value, hints[key])
    return cls(**kwargs)


def to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)
