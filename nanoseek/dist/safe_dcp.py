"""Reading torch.distributed.checkpoint (DCP) directories without running code from them.

DCP stores its index, `.metadata`, as a pickle, and loads non-tensor values with
`torch.load(weights_only=False)`: a crafted checkpoint would run its payload on resume, even in
a one-process run. Here the index is unpickled with an allowlist (DCP's own metadata records,
torch.Size, dtypes and layouts, paths - all inert data), non-tensor values go through torch's
weights-only unpickler, and every shard file the index names must be a plain name inside the
checkpoint directory.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from nanoseek.checkpoint.io import CheckpointError

METADATA = ".metadata"

# (module, name) pairs a DCP index may refer to; each is a record class or a constructor of
# inert values (an enum, a path, a layout looked up by name)
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch":  # dtypes and memory formats pickle as `torch.<name>`
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a checkpoint may not")


def read_metadata(checkpoint: str) -> Metadata:
    """The index of the DCP directory `checkpoint`, checked to be DCP's records and to name only
    shard files inside `checkpoint`; CheckpointError naming the file otherwise."""
    path = os.path.join(checkpoint, METADATA)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure: a corrupt or hostile file
        raise CheckpointError(f"{path}: not a valid checkpoint index ({_first_line(e)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: not a valid checkpoint index")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise CheckpointError(f"{path}: names a shard file outside the checkpoint: {name!r}")
    return metadata


def check_shards(checkpoint: str) -> None:
    """Every shard file the index names exists and is long enough for what it should hold (a
    save killed while writing, or a truncated copy); CheckpointError naming the file."""
    metadata = read_metadata(checkpoint)
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = int(info.offset) + int(info.length)
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for name, end in need.items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard file is missing")
        if os.path.getsize(path) < end:
            raise CheckpointError(f"{path}: truncated ({os.path.getsize(path)} of {end} bytes)")


class SafeReader(FileSystemReader):
    """DCP's file reader with the allowlisted index reader."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank indices: not written by nanoseek
            raise CheckpointError(f"{self.path}: per-rank checkpoint indices are not supported")
        metadata = read_metadata(os.fspath(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """Non-tensor values (e.g. an int optimizer step) through the weights-only unpickler, which
    builds only tensors and plain containers."""

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"checkpoint value '{fqn}' is not plain data (tensors, numbers, containers); "
                "refusing to unpickle it"
            ) from None
        except Exception as e:  # noqa: BLE001 - a corrupt value: the key names it
            raise CheckpointError(f"checkpoint value '{fqn}': {_first_line(e)}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _first_line(e: BaseException) -> str:
    """torch's unpickling errors span a screen; their first line says what was refused."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
