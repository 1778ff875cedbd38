"""Load and save Hugging Face DeepseekV3 checkpoint directories.

A directory holds `config.json` and either `model.safetensors` or shards named by
`model.safetensors.index.json` (`weight_map`). Loading builds the model on the meta device and
streams tensors one at a time into the final dtype and device (the full-precision copy of a
checkpoint never sits in memory); FP8 block-scaled weights are dequantised on the way in.
Saving writes into a temporary sibling directory and renames it into place, so a crash never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.checkpoint.fp8_format import (
    QUANTIZATION_CONFIG,
    block_dequantize,
    block_quantize,
    is_quantized_key,
)
from nanoseek.checkpoint.keys import hf_state_items, hf_to_ours, split_expert_key
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.fsio import WRITE_ERRNOS, WriteError, atomic_dir, naming, write_error, write_json
from nanoseek.model.transformer import CausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3
SAVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# load() scans weights up to this size for NaN/inf by default (1-3 s per GiB on one CPU core)
FINITE_SCAN_BYTES = 1024**3


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as asked; the message names the file or tensor."""


# ---------------------------------------------------------------------------------------- load
class TensorSink(Protocol):
    """Takes some weights of a checkpoint as they stream in, in place of the model (which keeps
    those parameters on the meta device): nanoseek/infer/streamed.py quantises them."""

    def keeps(self, name: str) -> bool:
        """Whether the sink takes parameter `name` (our name): it then stays on meta."""

    def take(self, name: str, t: torch.Tensor) -> None:
        """One tensor of a kept parameter (our name, experts per expert: split_expert_key)."""


def load(
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    check_finite: bool | None = None,
    sink: TensorSink | None = None,
) -> CausalLM:
    """Read a HF DeepseekV3 directory (bf16/fp32/FP8) into a CausalLM of `dtype` on `device`.

    The router's `e_score_correction_bias` stays fp32 whatever `dtype`. A checkpoint without the
    MTP layers (transformers drops them) loads with a warning and `num_nextn_predict_layers=0`.
    Every weight must be of a float dtype; check_finite: also scan every value for NaN/inf
    (None: only when the weights total at most FINITE_SCAN_BYTES, where the scan costs little
    next to reading them; `nanoseek info DIR --scan` scans any size). `sink`: takes the
    parameters it `keeps` as they stream in (dequantised from FP8 first); the model keeps them
    on the meta device.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    config = _read_config(directory)
    wm = weight_map(directory)
    if check_finite is None:
        size = sum(os.path.getsize(p) for p in set(wm.values()) if os.path.isfile(p))
        check_finite = size <= FINITE_SCAN_BYTES  # (a missing file is named when it is opened)
    L = config.num_hidden_layers
    if config.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{L}.") for k in wm):
        warnings.warn(
            f"{directory}: config has MTP modules but the checkpoint has no weights "
            "for them; loading without MTP",
            stacklevel=2,
        )
        config = config.replace(num_nextn_predict_layers=0)
    keep = None if sink is None else sink.keeps
    model = build_empty(config.replace(quantization_config=None), dtype, device, keep)
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    required = _required_keys(model)
    loaded: set[str] = set()
    unexpected: list[str] = []

    by_file: dict[str, list[str]] = {}
    for key, path in wm.items():
        if not key.endswith("_scale_inv"):
            by_file.setdefault(path, []).append(key)
    for path, keys in by_file.items():
        with _WindowedFile(path) as wf:
            for key in keys:
                name = hf_to_ours(key, L)
                # MTP copies of the shared embedding/head, and a tied head (= the embedding)
                if name is None or (name == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                target = _target(params, name)
                if target is None:
                    unexpected.append(key)
                    continue
                t = wf.read(key)
                if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    t = _dequantize(key, t, wf.f, path, wm)
                _check_values(path, key, t, check_finite)
                if tuple(t.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"{path}: tensor '{key}' has shape {tuple(t.shape)}, the config "
                        f"expects {tuple(target.shape)}"
                    )
                if target.is_meta:  # a parameter the sink keeps
                    sink.take(name, t)
                else:
                    with torch.no_grad():
                        target.copy_(t)
                loaded.add(key)
    missing = sorted(required - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: missing tensor '{missing[0]}'{more}")
    if unexpected:
        warnings.warn(
            f"{directory}: ignored {len(unexpected)} unknown tensors, e.g. '{unexpected[0]}'",
            stacklevel=2,
        )
    return model.eval()


def _check_values(path: str, key: str, t: torch.Tensor, finite: bool) -> None:
    """Weights are floats (an integer tensor would be cast silently) and, when asked, finite."""
    if not t.is_floating_point():
        raise CheckpointError(f"{path}: tensor '{key}' has dtype {t.dtype}, not a float dtype")
    if finite and not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{path}: tensor '{key}' holds {n} NaN or infinite values")


def scan(directory: str | os.PathLike) -> dict[str, int]:
    """Check every tensor of a checkpoint directory without building the model: a float dtype
    and finite values (FP8 weights checked as stored: their scales are tensors too). Raises
    CheckpointError naming the first bad file and tensor; returns {"tensors", "values"}."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    _read_config(directory)
    by_file: dict[str, list[str]] = {}
    for key, path in weight_map(directory).items():
        by_file.setdefault(path, []).append(key)
    tensors = values = 0
    for path, keys in sorted(by_file.items()):
        with _open(path) as f:
            for key in keys:
                t = _read(f, path, key)
                if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    t = t.float()  # fp8 e4m3 has a NaN but no inf: the float copy shows both
                _check_values(path, key, t, True)
                tensors, values = tensors + 1, values + t.numel()
    return {"tensors": tensors, "values": values}


def _read_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    try:
        return ModelConfig.from_pretrained(directory)
    except ConfigError as e:  # validate() names the field; add the file
        raise (e if path in str(e) else ConfigError(f"{path}: {e}")) from None


def weight_map(directory: str) -> dict[str, str]:
    """HF key -> safetensors file path for every tensor in the checkpoint directory."""
    index = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise TypeError("'weight_map' must map tensor names to file names")
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # + UnicodeDecodeError
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        for key, name in wm.items():
            _check_inside(directory, index, key, name)
        return {k: os.path.join(directory, v) for k, v in wm.items()}
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files and no {INDEX_NAME}")
    out: dict[str, str] = {}
    for name in files:
        path = os.path.join(directory, name)
        with _open(path) as f:
            out.update(dict.fromkeys(f.keys(), path))
    return out


def _check_inside(directory: str, index: str, key: str, name: str) -> None:
    """An index names files in its own directory: '../../etc/passwd', an absolute path or a
    symlink out of the directory would make loading read files it has no business reading."""
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(directory, name))
    if (
        not name
        or os.path.isabs(name)
        or ".." in name.replace("\\", "/").split("/")
        or os.path.commonpath([root, target]) != root
    ):
        raise CheckpointError(
            f"{index}: weight_map entry '{key}' names {name!r}, outside the model directory"
        )


class _WindowedFile:
    """A safetensors file read tensor by tensor, closed and reopened after every `window_bytes`
    read: the file is memory-mapped, and the pages a read touched count as the process's
    resident memory until it is closed (a 9 GB shard would add 9 GB to the peak of a model
    streamed into int8 near the memory limit, nanoseek/infer/streamed.py)."""

    def __init__(self, path: str, window_bytes: int = 512 * 1024**2):
        self.path, self.window_bytes = path, window_bytes
        self._stack = contextlib.ExitStack()
        self.f, self._read_bytes = None, 0

    def read(self, key: str) -> torch.Tensor:
        if self.f is None or self._read_bytes >= self.window_bytes:
            self._stack.close()
            self.f, self._read_bytes = self._stack.enter_context(_open(self.path)), 0
        t = _read(self.f, self.path, key)
        self._read_bytes += t.numel() * t.element_size()
        return t

    def __enter__(self) -> _WindowedFile:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


@contextlib.contextmanager
def _open(path: str):
    """safe_open with errors that name the file (missing, truncated or corrupt)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: safetensors file is missing")
    try:
        f = safe_open(path, framework="pt", device="cpu")  # reads and checks the header
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    with f:
        yield f


def _read(f, path: str, key: str) -> torch.Tensor:
    if key not in f.keys():  # the index names a tensor its file does not hold
        raise CheckpointError(f"{path}: has no tensor '{key}' (stale or wrong index?)")
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read tensor '{key}' ({e})") from None


def build_empty(config: ModelConfig, dtype: torch.dtype, device, keep_meta=None) -> CausalLM:
    """The model with uninitialised storage of the right dtype on `device` (no init cost);
    parameters whose name `keep_meta(name)` accepts stay on the meta device (no storage)."""
    with torch.device("meta"):
        model = CausalLM(config)
    model.to(dtype)  # the router bias stays fp32 (Router._apply)
    if keep_meta is None:
        model.to_empty(device=device)
    else:
        for prefix, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if not keep_meta(f"{prefix}.{pname}" if prefix else pname):
                    empty = torch.empty_like(p, device=device)
                    setattr(module, pname, torch.nn.Parameter(empty, p.requires_grad))
            for bname, b in module.named_buffers(recurse=False):
                module._buffers[bname] = torch.empty_like(b, device=device)
    if config.tie_word_embeddings:  # to_empty makes new Parameters: the tie is lost
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    return model


def _required_keys(model: CausalLM) -> set[str]:
    """HF keys a checkpoint of `model` must hold: everything we write, except the MTP layers'
    copies of shared weights, and the router bias where the router ignores it (non-noaux_tc,
    e.g. V2 checkpoints, which do not have it; it stays zero)."""
    config = model.config
    uses_bias = config.topk_method == "noaux_tc"
    return {
        key
        for key, _ in hf_state_items(model)
        if hf_to_ours(key, config.num_hidden_layers) is not None
        and (uses_bias or not key.endswith("e_score_correction_bias"))
    }


def _target(params: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The (view of the) parameter an HF tensor fills; expert matrices are slices of 3D tensors."""
    split = split_expert_key(name)
    if split is None:
        return params.get(name)
    base, e, kind = split
    if kind == "down_proj":
        w = params.get(f"{base}.down_proj")
        return None if w is None or e >= w.shape[0] else w[e]
    w = params.get(f"{base}.gate_up_proj")
    if w is None or e >= w.shape[0]:
        return None
    F = w.shape[1] // 2
    return w[e, :F] if kind == "gate_proj" else w[e, F:]


def _dequantize(key: str, w: torch.Tensor, f, path: str, wm: dict[str, str]) -> torch.Tensor:
    scale_key = key + "_scale_inv"
    if scale_key not in wm:
        raise CheckpointError(f"{path}: tensor '{key}' is float8 but '{scale_key}' is missing")
    scale_path = wm[scale_key]
    if scale_path == path:
        scale = _read(f, path, scale_key)
    else:
        with _open(scale_path) as g:
            scale = _read(g, scale_path, scale_key)
    try:
        return block_dequantize(w, scale)
    except ValueError as e:
        raise CheckpointError(f"{path}: tensor '{key}': {e}") from None


# ---------------------------------------------------------------------------------------- save
def save(
    model: CausalLM,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    fp8: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_files: Iterable[str | os.PathLike] = (),
) -> None:
    """Write `model` as a HF DeepseekV3 directory, atomically (temp dir + rename).

    dtype: storage dtype of the weights (default: the model's); the router bias is always fp32.
    fp8: write the official block-scaled FP8 format for the projection weights.
    max_shard_bytes: above this, several `model-0000i-of-0000n.safetensors` plus the index.
    extra_files: files copied alongside (e.g. tokenizer.json, tokenizer_config.json).
    An existing `directory` is replaced as a whole (files in it that we do not write are gone).
    """
    config = model.config.replace(torch_dtype=str(dtype or model.dtype).removeprefix("torch."))
    save_tensors(hf_state_items(model), config, directory, dtype, fp8, max_shard_bytes,
                 extra_files)  # fmt: skip


def save_tensors(
    items: Iterable[tuple[str, torch.Tensor]],
    config: ModelConfig,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    fp8: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_files: Iterable[str | os.PathLike] = (),
) -> None:
    """`save` from (HF key, tensor) pairs made one at a time (a checkpoint larger than memory:
    bench/v2_lite.py writes random weights of a 15.7B model this way). Same arguments."""
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {SAVE_DTYPES} (for FP8 use fp8=True), got {dtype}")
    directory = os.path.abspath(os.fspath(directory))
    if os.path.lexists(directory) and (not os.path.isdir(directory) or os.path.islink(directory)):
        raise CheckpointError(f"{directory}: exists and is not a directory; not replacing it")
    if (
        os.path.isdir(directory)
        and os.listdir(directory)
        and not os.path.exists(os.path.join(directory, "config.json"))
    ):  # replacing a checkpoint is fine; wiping an unrelated folder (`save(m, "~")`) is not
        raise CheckpointError(
            f"{directory}: exists, is not empty and is not a checkpoint; not replacing it"
        )
    try:
        with atomic_dir(directory) as tmp:
            config = config.replace(quantization_config=dict(QUANTIZATION_CONFIG) if fp8 else None)
            config.save_pretrained(tmp)
            writer = _ShardWriter(tmp, max_shard_bytes)
            for key, t in items:
                for k, v in _encode(key, t, dtype, fp8):
                    writer.add(k, v)
            writer.close()
            for path in extra_files:
                if os.path.exists(os.path.join(tmp, os.path.basename(path))):
                    raise ValueError(f"{path}: would overwrite a checkpoint file of the same name")
                shutil.copy(path, tmp)
    except OSError as e:  # full disk, read-only folder: the previous checkpoint is still there
        if isinstance(e, WriteError) or e.errno in WRITE_ERRNOS:
            then = "; nothing saved there before was changed"
            raise write_error(directory, e, "cannot save the checkpoint", then) from None
        raise


def _encode(key: str, t: torch.Tensor, dtype: torch.dtype | None, fp8: bool):
    """(key, tensor) pairs to store for one HF tensor: fresh contiguous CPU copies."""
    t = t.detach().cpu()
    if key.endswith("e_score_correction_bias"):  # fp32 always, as released
        yield key, t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    elif fp8 and is_quantized_key(key):
        q, scale = block_quantize(t)
        yield key, q
        yield key + "_scale_inv", scale
    else:
        yield key, t.to(dtype or t.dtype, memory_format=torch.contiguous_format, copy=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class _ShardWriter:
    """Writes tensors into files of at most `max_bytes` each (a larger tensor gets its own file),
    under provisional names; `close` names them as HF does and writes the index."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[str] = []
        self.file_of: dict[str, int] = {}  # key -> index into self.files
        self.total_bytes = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[key] = t
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        name = f"part-{len(self.files) + 1:05d}.safetensors"
        path = os.path.join(self.directory, name)
        with naming(path):  # safetensors' own error would not say which file
            save_file(self.pending, path, metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_UMASK)  # safetensors creates 0600; other files follow the umask
        self.file_of.update(dict.fromkeys(self.pending, len(self.files)))
        self.files.append(name)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self.files)
        final = (
            [SINGLE_NAME]
            if n == 1
            else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        for src, dst in zip(self.files, final):
            os.replace(os.path.join(self.directory, src), os.path.join(self.directory, dst))
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {k: final[i] for k, i in self.file_of.items()},
            }
            write_json(os.path.join(self.directory, INDEX_NAME), index)
