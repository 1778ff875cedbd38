"""Atomic writes, and write errors that name the path.

Every file and folder a run writes appears under its final name complete or not at all: the data
goes to a sibling temp name, is fsynced (else a power cut can publish a file of zeros), then
renamed over the final name. A kill -9 leaves at most a temp sibling, named
`<final>.tmp-<pid>-<hex>`, which `nanoseek.train.run_dir.clean_staging` removes at the next start.

A full disk or an unwritable folder becomes one `OSError` whose message names the path being
written and the reason, raised before the final name is touched, so whatever was there before
(the previous checkpoint, the previous options.json) is still there.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any


def sibling(path: str, kind: str) -> str:
    """A fresh name beside `path`: `<path>.<kind>-<pid>-<random>` (run_dir cleans these)."""
    return f"{path}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def reason(e: BaseException) -> str:
    """The why of a failed write in a few words ('No space left on device')."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    # safetensors' Rust errors spell the OS error inside a debug dump: keep the readable part
    for marker, words in (
        ("StorageFull", "No space left on device"),
        ("No space left", "No space left on device"),
        ("PermissionDenied", "Permission denied"),
        ("ReadOnlyFilesystem", "Read-only file system"),
    ):
        if marker in text:
            return words
    return " ".join(text.split()) or type(e).__name__


# errors that mean "this place cannot take the data", whichever file was being written
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)


class WriteError(OSError):
    """A failed write; `str()` is the one-line message alone (no `[Errno N]` prefix) and
    `why` the reason alone ('No space left on device')."""

    why = ""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def write_error(
    path: str | os.PathLike, e: BaseException, what: str = "cannot write", then: str = ""
) -> WriteError:
    """`e` as a WriteError whose message is `<path>: <what> (<reason>)<then>`."""
    why = getattr(e, "why", "") or reason(e)
    code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
    if "No space left" in why:
        code = errno.ENOSPC
    err = WriteError(code, f"{os.fspath(path)}: {what} ({why}){then}")
    err.why = why
    return err


def is_write_failure(e: BaseException) -> bool:
    """OS errors, and the errors writers built on native code raise for them (safetensors'
    SafetensorError; torch's 'unexpected pos' RuntimeError on a short write)."""
    if isinstance(e, OSError):
        return True
    name = type(e).__name__
    return name == "SafetensorError" or (isinstance(e, RuntimeError) and "pos" in str(e))


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write inside the block into one OSError naming `path`."""
    try:
        yield
    except BaseException as e:
        if is_write_failure(e) and not isinstance(e, WriteError):  # inner one named it
            raise write_error(path, e) from None
        raise


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str) -> None:
    """Every file under `directory` on disk (before a rename publishes them)."""
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(os.path.join(root, name))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` as the file `path`, atomically (temp sibling, fsync, rename)."""
    path = os.fspath(path)
    tmp = sibling(path, "tmp")
    with naming(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, **kw: Any) -> None:
    """`obj` as JSON (plus a final newline) in `path`, atomically."""
    write_text(path, json.dumps(obj, indent=indent, **kw) + "\n")


def swap_into_place(tmp: str, directory: str) -> None:
    """rename(tmp -> directory). An existing directory is renamed aside first and deleted after;
    if the second rename fails it is put back. (POSIX cannot swap two directories atomically:
    a crash between the renames leaves the previous one at `<directory>.old-*`, which
    run_dir.clean_staging puts back.)"""
    if not os.path.lexists(directory):
        os.rename(tmp, directory)
        return
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise OSError(errno.EEXIST, f"{directory}: exists and is not a directory; not replacing it")
    old = sibling(directory, "old")
    os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(directory: str | os.PathLike, keep_if_same: bool = False) -> Iterator[str]:
    """Yield a fresh sibling folder to fill; on success it replaces `directory` as a whole
    (files in the old one that were not rewritten are gone). On any error the sibling is
    deleted, `directory` is untouched, and a write failure names `directory`.
    keep_if_same: a `directory` with the same files, byte for byte, is left as it is (its
    mtime too: a run restarted 100 times does not rewrite its tokenizer 100 times)."""
    directory = os.path.abspath(os.fspath(directory))
    tmp = sibling(directory, "tmp")
    with naming(directory):
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        # not tempfile.mkdtemp: its mode 0700 would become the folder's; mkdir honours the umask
        os.mkdir(tmp)
    try:
        yield tmp
        if keep_if_same and _same_tree(tmp, directory):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        with naming(directory):
            fsync_tree(tmp)
            swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _same_tree(a: str, b: str) -> bool:
    """Whether the flat folders `a` and `b` hold the same file names with the same bytes."""
    if not os.path.isdir(b) or os.path.islink(b):
        return False
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)) or not all(os.path.isfile(os.path.join(a, n)) for n in names):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def copy_dir(src_files: list[str], directory: str | os.PathLike) -> list[str]:
    """Copy `src_files` into the folder `directory`, which they replace atomically (an
    identical folder is left as it is). Returns the copies' paths."""
    directory = os.path.abspath(os.fspath(directory))
    with atomic_dir(directory, keep_if_same=True) as tmp:
        for path in src_files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
    return [os.path.join(directory, os.path.basename(p)) for p in src_files]
