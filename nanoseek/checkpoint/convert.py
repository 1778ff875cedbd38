"""Convert a checkpoint directory between bf16, fp32 and the FP8 release format, streaming.

The 671B V3 checkpoint is ~1.3 TB in bf16 (~690 GB in FP8): no machine holds it in memory, so
unlike `load` + `save` this never builds a model. It works on the HF keys (keys.py)
directly: source tensors are read one at a time with `safe_open` and appended to an output shard
that is written out once it reaches `max_shard_bytes`. Memory peaks near one output shard plus
one tensor and its conversion temporaries, whatever the checkpoint size.

    FP8 -> bf16/fp32   every float8 weight is dequantised with its `<key>_scale_inv` (which may
                       sit in another shard: the weight_map says where); the scales and
                       `quantization_config` are dropped.
    bf16/fp32 -> FP8   exactly the keys `is_quantized_key` selects become float8 + scale_inv
                       (128x128 blocks, ragged edges); everything else is stored in bf16, as in
                       the official release; `quantization_config` is added.
    FP8 -> FP8         float8 weights and their scales are copied unchanged (a re-shard).
The router's `e_score_correction_bias` stays fp32 in every direction, as released.

The bf16 -> FP8 -> bf16 result is bit-identical to `save(model, fp8=True)` then `load`: both use
`block_quantize` / `block_dequantize`, and both round fp32 -> bf16 once, at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import torch

from nanoseek.checkpoint.fp8_format import (
    QUANTIZATION_CONFIG,
    block_dequantize,
    block_quantize,
    is_quantized_key,
)

# io.py's private helpers, so that `convert` and `save` share error messages, shard names and
# the atomic replacement
from nanoseek.checkpoint.io import (
    DEFAULT_SHARD_BYTES,
    CheckpointError,
    _open,
    _read,
    _ShardWriter,
    weight_map,
)
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.fsio import atomic_dir

# storage dtype of the tensors that are neither quantised nor the router bias
TARGET_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")  # not copied: we write our own
# safetensors header dtype names (what `get_slice(k).get_dtype()` returns) -> bytes per value
_ST_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_ST_FP8 = ("F8_E4M3", "F8_E5M2")
_ST_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip

Progress = Callable[[int, int], None]  # (source bytes done, source bytes in all)


def convert_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    dtype: str,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the checkpoint in `src_dir` to `dst_dir` stored as `dtype` ("bf16", "fp32", "fp8").

    dst_dir is written atomically (temp sibling + rename). An existing checkpoint there (a
    directory with config.json) is replaced; any other non-empty path is refused. Files beside
    the weights (tokenizer, generation_config.json, README...) are copied; subdirectories are not.
    `progress(done, total)` is called after each source tensor, in source bytes.
    Returns statistics: tensors read/written/quantised/dequantised, bytes, shards, time.
    """
    if dtype not in TARGET_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TARGET_DTYPES)}, got {dtype!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    t0 = time.perf_counter()
    src, dst = os.path.abspath(os.fspath(src_dir)), os.path.abspath(os.fspath(dst_dir))
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: no such checkpoint directory")
    _check_destination(src, dst)
    config = _read_config(src)  # a bad config fails now, not after an hour of conversion
    wm = weight_map(src)
    headers = _scan(wm)  # every file opened and every scale found before anything is written

    with atomic_dir(dst) as tmp:  # temp sibling, renamed into place once complete
        config.replace(
            torch_dtype=str(TARGET_DTYPES[dtype]).removeprefix("torch."),  # fp8: bfloat16
            quantization_config=dict(QUANTIZATION_CONFIG) if dtype == "fp8" else None,
        ).save_pretrained(tmp)
        stats = _convert_tensors(wm, headers, tmp, dtype, max_shard_bytes, progress)
        copied = _copy_other_files(src, tmp)
    stats.update(
        src_dir=src, dst_dir=dst, dtype=dtype, copied_files=copied,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip
    return stats


def _check_destination(src: str, dst: str) -> None:
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_src == real_dst:
        raise CheckpointError(f"{dst}: the output directory must differ from the source")
    if os.path.commonpath([real_src, real_dst]) == real_dst:
        raise CheckpointError(f"{dst}: contains the source {src}; refusing to replace it")
    if os.path.lexists(dst):
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise CheckpointError(f"{dst}: exists and is not a directory; refusing to replace it")
        if os.listdir(dst) and not os.path.isfile(os.path.join(dst, "config.json")):
            raise CheckpointError(
                f"{dst}: exists, is not empty and holds no config.json; refusing to replace it"
            )


def _read_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (every checkpoint directory has a config.json)")
    try:
        return ModelConfig.from_pretrained(directory)
    except ConfigError as e:  # validate() names the field; add the file
        raise (e if path in str(e) else ConfigError(f"{path}: {e}")) from None


def _natural(key: str) -> list:
    """'model.layers.10.x' after 'model.layers.9.x': shards then follow the layer order."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def _scan(wm: dict[str, str]) -> dict[str, tuple[str, int]]:
    """HF key -> (safetensors dtype name, bytes), from the headers only. Checks that every file
    opens, holds the tensors the index gives it, and that float8 weights and scales pair up."""
    headers: dict[str, tuple[str, int]] = {}
    by_file: dict[str, list[str]] = {}
    for key, path in wm.items():
        by_file.setdefault(path, []).append(key)
    for path in sorted(by_file):
        with _open(path) as f:
            present = set(f.keys())
            for key in by_file[path]:
                if key not in present:  # the index names a tensor its file does not hold
                    raise CheckpointError(f"{path}: has no tensor '{key}' (stale or wrong index?)")
                sl = f.get_slice(key)
                st_dtype, shape = sl.get_dtype(), sl.get_shape()
                numel = 1
                for n in shape:
                    numel *= n
                headers[key] = (st_dtype, numel * _ST_BYTES.get(st_dtype, 1))
    for key, (st_dtype, _) in headers.items():
        if st_dtype in _ST_FP8 and key + SCALE_SUFFIX not in headers:
            raise CheckpointError(
                f"{wm[key]}: tensor '{key}' is float8 but '{key}{SCALE_SUFFIX}' is missing"
            )
        weight = key.removesuffix(SCALE_SUFFIX)
        if weight != key and headers.get(weight, ("",))[0] not in _ST_FP8:
            raise CheckpointError(f"{wm[key]}: scale '{key}' has no float8 weight '{weight}'")
    return headers


def _convert_tensors(
    wm: dict[str, str],
    headers: dict[str, tuple[str, int]],
    out_dir: str,
    dtype: str,
    max_shard_bytes: int,
    progress: Progress | None,
) -> dict[str, Any]:
    """Stream every tensor of `wm` into shards in `out_dir`, one source file open at a time."""
    by_file: dict[str, list[str]] = {}
    for key in sorted(wm, key=_natural):
        if not key.endswith(SCALE_SUFFIX):  # a scale travels with its weight
            by_file.setdefault(wm[key], []).append(key)
    total = sum(n for _, n in headers.values())
    done = n_quantized = n_dequantized = 0
    counts: dict[str, int] = {}
    writer = _ShardWriter(out_dir, max_shard_bytes)
    with ExitStack() as scale_files:  # files read only for a scale: their few pages stay mapped
        opened: dict[str, Any] = {}

        def read_scale(key: str, f, path: str) -> torch.Tensor:
            scale_path = wm[key]
            if scale_path == path:
                return _read(f, path, key)
            if scale_path not in opened:
                opened[scale_path] = scale_files.enter_context(_open(scale_path))
            return _read(opened[scale_path], scale_path, key)

        for path in sorted(by_file):
            with _open(path) as f:  # closed before the next: its pages leave our address space
                for key in by_file[path]:
                    t = _read(f, path, key)
                    scale = None
                    if t.dtype in FP8_DTYPES:
                        scale = read_scale(key + SCALE_SUFFIX, f, path)
                        done += headers[key + SCALE_SUFFIX][1]
                    for k, v in _convert_one(key, t, scale, dtype, path):
                        writer.add(k, v)
                        name = _ST_NAMES.get(v.dtype, str(v.dtype))
                        counts[name] = counts.get(name, 0) + 1
                    n_quantized += dtype == "fp8" and scale is None and is_quantized_key(key)
                    n_dequantized += dtype != "fp8" and scale is not None
                    del t, scale
                    done += headers[key][1]
                    if progress is not None:
                        progress(done, total)
    writer.close()
    n = len(writer.files)
    return {
        "tensors_read": len(wm),
        "tensors_written": sum(counts.values()),
        "quantized": n_quantized,
        "dequantized": n_dequantized,
        "dtypes": dict(sorted(counts.items())),
        "src_bytes": total,
        "dst_bytes": writer.total_bytes,
        "shards": n,
    }


def _convert_one(
    key: str, t: torch.Tensor, scale: torch.Tensor | None, dtype: str, path: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs to store for one source tensor (and its scale, for a float8 one)."""
    if scale is not None:
        if dtype == "fp8":  # already in the target format: copied bit for bit
            yield key, t
            yield key + SCALE_SUFFIX, scale
            return
        try:
            yield key, block_dequantize(t, scale, dtype=TARGET_DTYPES[dtype])
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor '{key}': {e}") from None
    elif key.endswith("e_score_correction_bias"):  # fp32 always, as released
        yield key, t.to(torch.float32)
    elif dtype == "fp8" and is_quantized_key(key):
        try:
            q, s = block_quantize(t)
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor '{key}': {e}") from None
        yield key, q
        yield key + SCALE_SUFFIX, s
    elif t.is_floating_point():
        yield key, t.to(TARGET_DTYPES[dtype])
    else:  # integer tensors (none in DeepSeek checkpoints) keep their type
        yield key, t


def _copy_other_files(src: str, dst: str) -> list[str]:
    """Copy every regular file of `src` that is not config.json or weights; return the names.
    (Symlinks, as in a huggingface_hub snapshot, are followed: the copy holds the content.)"""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name == "config.json" or name.endswith(WEIGHT_SUFFIXES) or not os.path.isfile(path):
            continue
        shutil.copyfile(path, os.path.join(dst, name))
        copied.append(name)
    return copied
