"""Document sources: what a document is per format, and errors that name the file (and line)."""

from __future__ import annotations

import json
import sys

import pytest

from nanoseek.data.sources import (
    DataSourceError,
    read_documents,
    read_jsonl,
    read_parquet,
    read_text,
)


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# ----------------------------------------------------------------------------- plain text
def test_text_file_is_one_verbatim_document(tmp_path):
    p = tmp_path / "a.txt"
    text = "  First line\n\nSecond  paragraph 中文 😀\n\n\n"
    p.write_text(text, encoding="utf-8")
    assert list(read_text(p)) == [text]


def test_text_separator_splits_and_drops_blank_parts(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("\n\nalpha\nbeta\n\n\n\ngamma\n\n \n\n", encoding="utf-8")
    assert list(read_text(p, separator="\n\n")) == ["alpha\nbeta", "gamma"]
    with pytest.raises(ValueError, match="separator"):
        list(read_text(p, separator=""))


def test_missing_file_names_it(tmp_path):
    p = tmp_path / "nope.txt"
    for reader in (read_text, read_jsonl, read_parquet):
        with pytest.raises(FileNotFoundError, match="nope.txt"):
            list(reader(p))


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.parquet"])
def test_empty_file_names_it(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"")
    with pytest.raises(DataSourceError, match=f"{name}: file is empty"):
        list(read_documents(p))


def test_whitespace_only_file_has_no_documents(tmp_path):
    p = tmp_path / "blank.txt"
    p.write_text(" \n\n \t\n")
    with pytest.raises(DataSourceError, match="blank.txt: holds no documents"):
        list(read_text(p))


def test_invalid_utf8_text_names_file(tmp_path):
    p = tmp_path / "bin.txt"
    p.write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(DataSourceError, match="bin.txt: not valid utf-8 at byte 3"):
        list(read_text(p))


# ----------------------------------------------------------------------------- JSONL
def test_jsonl_reads_field_skips_blank_lines_and_empty_docs(tmp_path):
    p = tmp_path / "c.jsonl"
    write_jsonl(p, [{"text": "one"}, "", {"text": "two\n\nlines", "id": 2}, {"text": ""}])
    assert list(read_jsonl(p)) == ["one", "two\n\nlines"]
    q = tmp_path / "d.jsonl"
    write_jsonl(q, [{"body": "x"}, {"body": "y"}])
    assert list(read_jsonl(q, field="body")) == ["x", "y"]


def test_jsonl_accepts_byte_order_mark(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "x"}).encode() + b"\n")
    assert list(read_jsonl(p)) == ["x"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"text": "unterminated', "invalid JSON"),
        ('["a list"]', "expected a JSON object, got list"),
        ('{"title": "no text"}', "no field 'text' \\(fields: title\\)"),
        ('{"text": 42}', "field 'text' is int, expected a string"),
        ('{"text": null}', "field 'text' is NoneType"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad, message):
    p = tmp_path / "corpus.jsonl"
    write_jsonl(p, [{"text": "fine"}, "", bad, {"text": "never reached"}])
    docs = read_jsonl(p)
    assert next(docs) == "fine"  # streaming: earlier lines are yielded before the error
    with pytest.raises(DataSourceError, match=f"corpus.jsonl:3: {message}"):
        next(docs)


def test_invalid_utf8_jsonl_names_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataSourceError, match="c.jsonl:2: not valid UTF-8"):
        list(read_jsonl(p))


def test_jsonl_without_documents(tmp_path):
    p = tmp_path / "c.jsonl"
    write_jsonl(p, [{"text": ""}, {"text": "  "}])
    with pytest.raises(DataSourceError, match="c.jsonl: holds no documents"):
        list(read_jsonl(p))


# ----------------------------------------------------------------------------- Parquet
def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "c.parquet"
    docs = [f"document {i} 中文" for i in range(2500)] + [""]
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), p, row_group_size=1000)
    assert list(read_parquet(p, batch_size=300)) == docs[:-1]
    assert list(read_documents(p)) == docs[:-1]


def test_parquet_errors_name_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["a", None], "n": [1, 2]}), p)
    with pytest.raises(DataSourceError, match="c.parquet: no column 'text' \\(columns: body, n\\)"):
        list(read_parquet(p))
    with pytest.raises(DataSourceError, match="c.parquet: column 'n' has type int64"):
        list(read_parquet(p, column="n"))
    with pytest.raises(DataSourceError, match="c.parquet: row 1: column 'body' is null"):
        list(read_parquet(p, column="body"))
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataSourceError, match="junk.parquet: not a readable Parquet file"):
        list(read_parquet(junk))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    p = tmp_path / "c.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(read_parquet(p))


# ----------------------------------------------------------------------------- dispatch
def test_read_documents_dispatches_on_suffix(tmp_path):
    t, j = tmp_path / "a.txt", tmp_path / "b.jsonl"
    t.write_text("p1\n\np2")
    write_jsonl(j, [{"text": "j1"}])
    assert list(read_documents([t, j])) == ["p1\n\np2", "j1"]
    assert list(read_documents([t, j], separator="\n\n")) == ["p1", "p2", "j1"]
    assert list(read_documents(str(t))) == ["p1\n\np2"]


def test_read_documents_checks_all_paths_first(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("ok")
    docs = read_documents([t, tmp_path / "missing.jsonl"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        next(docs)  # fails before yielding the first file's document


def test_read_documents_rejects_json_and_nothing(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[{"text": "x"}]')
    with pytest.raises(DataSourceError, match="a.json: .json files are not read"):
        list(read_documents(p))
    with pytest.raises(ValueError, match="no corpus files"):
        list(read_documents([]))
