"""Read documents (strings) from plain text, JSONL and Parquet files.

A *document* is the unit the shard writer wraps as `bos + tokens + eos` and the unit of the
train/validation split, so where one document ends matters:
- `.txt` (and any unknown suffix): one file is one document by default (a book, a source file);
  pass `separator` (e.g. "\\n\\n") to split a file into many documents. Text files are read whole;
  stream very large corpora from JSONL or Parquet instead.
- `.jsonl` / `.ndjson`: one JSON object per line, the document in field `field` ("text").
- `.parquet`: one row per document, in column `column` ("text"); needs `pyarrow`, imported
  only when a Parquet file is read.

Documents that are empty or whitespace-only are skipped everywhere (they would become a bare
`bos eos` pair). Every failure is a `DataSourceError` (a ValueError) or `FileNotFoundError` whose
message names the file, and for JSONL the line: `corpus.jsonl:17: invalid JSON (...)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class DataSourceError(ValueError):
    """A corpus file that cannot be read as documents; the message names the file (and line)."""


def _check_file(path: str | os.PathLike) -> Path:
    """Missing and empty files fail here, before any reader starts, with the path in the message."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus file not found: {p}")
    if not p.is_file():
        raise DataSourceError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise DataSourceError(f"{p}: file is empty")
    return p


def _keep(doc: str) -> bool:
    return bool(doc) and not doc.isspace()


def read_text(
    path: str | os.PathLike, *, separator: str | None = None, encoding: str = "utf-8"
) -> Iterator[str]:
    """Yield the file as one document, or its `separator`-delimited parts as documents.

    Documents are yielded verbatim (no stripping), so text round-trips through the tokenizer
    exactly; empty and whitespace-only parts are dropped.
    """
    p = _check_file(path)
    if separator == "":
        raise ValueError("separator must be a non-empty string or None")
    try:
        text = p.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{p}: not valid {encoding} at byte {e.start}: {e.reason}") from e
    parts = [text] if separator is None else text.split(separator)
    found = False
    for doc in parts:
        if _keep(doc):
            found = True
            yield doc
    if not found:
        raise DataSourceError(f"{p}: holds no documents (only whitespace)")


def read_jsonl(path: str | os.PathLike, *, field: str = "text") -> Iterator[str]:
    """Yield `obj[field]` for each line; blank lines are skipped, anything else malformed raises
    with `file:line` in the message (a silently dropped line is a silently shrunken corpus)."""
    p = _check_file(path)
    found = False
    # binary mode, decoding line by line: a decode error then names its own line, whereas text
    # mode decodes in blocks and would report it lines early
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig drops a byte-order mark, which editors on Windows like to add
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataSourceError(f"{p}:{lineno}: not valid UTF-8 ({e.reason})") from e
            if line.isspace():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{p}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DataSourceError(
                    f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            if field not in obj:
                keys = ", ".join(sorted(obj)) or "none"
                raise DataSourceError(f"{p}:{lineno}: no field {field!r} (fields: {keys})")
            doc = obj[field]
            if not isinstance(doc, str):
                raise DataSourceError(
                    f"{p}:{lineno}: field {field!r} is {type(doc).__name__}, expected a string"
                )
            if _keep(doc):
                found = True
                yield doc
    if not found:
        raise DataSourceError(f"{p}: holds no documents (no non-empty {field!r} values)")


def _import_pyarrow_parquet():
    """pyarrow is optional: only Parquet users need it, so import it on first use."""
    try:
        import pyarrow.parquet as pq  # optional: the `parquet` extra
    except ImportError as e:
        raise ImportError("reading Parquet files needs pyarrow: pip install pyarrow") from e
    return pq


def read_parquet(
    path: str | os.PathLike, *, column: str = "text", batch_size: int = 1024
) -> Iterator[str]:
    """Yield the string column `column` row by row, reading `batch_size` rows at a time."""
    p = _check_file(path)
    pq = _import_pyarrow_parquet()
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family
        raise DataSourceError(f"{p}: not a readable Parquet file ({e})") from e
    names = pf.schema_arrow.names
    if column not in names:
        raise DataSourceError(f"{p}: no column {column!r} (columns: {', '.join(names)})")
    col_type = pf.schema_arrow.field(column).type
    if str(col_type) not in ("string", "large_string", "string_view"):
        raise DataSourceError(f"{p}: column {column!r} has type {col_type}, expected string")
    row, found = 0, False
    for batch in pf.iter_batches(batch_size=batch_size, columns=[column]):
        for doc in batch.column(0).to_pylist():
            if doc is None:
                raise DataSourceError(f"{p}: row {row}: column {column!r} is null")
            if _keep(doc):
                found = True
                yield doc
            row += 1
    if not found:
        raise DataSourceError(f"{p}: holds no documents (no non-empty {column!r} values)")


def read_documents(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    field: str = "text",
    separator: str | None = None,
) -> Iterator[str]:
    """Yield documents from one or many files, dispatching on the suffix.

    `field` names the JSONL field or Parquet column; `separator` splits text files (see the module
    docstring). All paths are checked before the first document is yielded, so a typo in the
    tenth path fails at once rather than after nine files were tokenised.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    checked = [_check_file(p) for p in paths]
    if not checked:
        raise ValueError("no corpus files given")
    for p in checked:
        suffix = p.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from read_jsonl(p, field=field)
        elif suffix in PARQUET_SUFFIXES:
            yield from read_parquet(p, column=field)
        elif suffix == ".json":
            # a JSON array read as plain text would silently become one giant document
            raise DataSourceError(f"{p}: .json files are not read; convert to JSONL (.jsonl)")
        else:
            yield from read_text(p, separator=separator)
