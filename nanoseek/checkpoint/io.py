"""Load and save Hugging Face DeepseekV3 checkpoint directories.

A directory holds `config.json` and either `model.safetensors` or shards named by
`model.safetensors.index.json` (`weight_map`). Loading builds the model on the meta device and
streams tensors one at a time into the final dtype and device (the full-precision copy of a
checkpoint never sits in memory); FP8 block-scaled weights are dequantised on the way in.
Saving writes into a temporary sibling directory and renames it into place, so a crash never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterable

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
from nanoseek.config import ModelConfig
from nanoseek.model.transformer import CausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as asked; the message names the file or tensor."""


# ---------------------------------------------------------------------------------------- load
def weight_map(directory: str) -> dict[str, str]:
    """HF key -> safetensors file path for every tensor in the checkpoint directory."""
    index = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
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


class _open:
    """safe_open with errors that name the file (truncated or corrupt files)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        if not os.path.exists(self.path):
            raise CheckpointError(f"{self.path}: file listed in the index is missing")
        try:
            self._cm = safe_open(self.path, framework="pt", device="cpu")
            return self._cm.__enter__()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{self.path}: corrupt or truncated safetensors file ({e})"
            ) from None

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _read(f, path: str, key: str) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: cannot read tensor '{key}' (corrupt or truncated: {e})"
        ) from None


def build_empty(config: ModelConfig, dtype: torch.dtype, device) -> CausalLM:
    """The model with uninitialised storage of the right dtype on `device` (no init cost)."""
    with torch.device("meta"):
        model = CausalLM(config)
    model.to(dtype)  # the router bias stays fp32 (Router._apply)
    model.to_empty(device=device)
    model.reset_buffers()
    return model


def load(
    directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"
) -> CausalLM:
    """Read a HF DeepseekV3 directory (bf16/fp32/FP8) into a CausalLM of `dtype` on `device`."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    config = ModelConfig.from_pretrained(directory)
    wm = weight_map(directory)
    L = config.num_hidden_layers
    if config.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{L}.") for k in wm):
        # e.g. saved by transformers, which drops the MTP layer: load the main model only
        warnings.warn(
            f"{directory}: config has MTP modules but the checkpoint has no weights "
            "for them; loading without MTP",
            stacklevel=2,
        )
        config = config.replace(num_nextn_predict_layers=0)
    config.quantization_config = None  # the loaded model is dequantised
    model = build_empty(config, dtype, device)
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    expected = set(k for k, _ in hf_state_items(model))
    loaded: set[str] = set()
    unexpected: list[str] = []

    by_file: dict[str, list[str]] = {}
    for key, path in wm.items():
        if not key.endswith("_scale_inv"):
            by_file.setdefault(path, []).append(key)
    for path, keys in by_file.items():
        with _open(path) as f:
            for key in keys:
                name = hf_to_ours(key, L)
                if name is None:
                    loaded.add(key)
                    continue
                target = _target(params, name)
                if target is None:
                    unexpected.append(key)
                    continue
                t = _read(f, path, key)
                if t.dtype == torch.float8_e4m3fn:
                    t = _dequantize(key, t, wm)
                if tuple(t.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"{path}: tensor '{key}' has shape {tuple(t.shape)}, the config "
                        f"expects {tuple(target.shape)}"
                    )
                with torch.no_grad():
                    target.copy_(t)
                loaded.add(key)
    missing = sorted(expected - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: missing tensor '{missing[0]}'{more}")
    if unexpected:
        warnings.warn(
            f"{directory}: ignored {len(unexpected)} unknown tensors, e.g. '{unexpected[0]}'",
            stacklevel=2,
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


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


def _dequantize(key: str, w: torch.Tensor, wm: dict[str, str]) -> torch.Tensor:
    scale_key = key + "_scale_inv"
    if scale_key not in wm:
        raise CheckpointError(f"tensor '{key}' is float8 but '{scale_key}' is missing")
    with _open(wm[scale_key]) as f:
        scale = _read(f, wm[scale_key], scale_key)
    try:
        return block_dequantize(w, scale)
    except ValueError as e:
        raise CheckpointError(f"tensor '{key}': {e}") from None


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
    fp8: write the official block-scaled FP8 format (REFERENCE §1.8) for the projection weights.
    extra_files: files copied alongside (e.g. tokenizer.json, tokenizer_config.json).
    """
    directory = os.fspath(directory).rstrip("/")
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    config = model.config.replace(
        torch_dtype=str(dtype or model.dtype).removeprefix("torch."),
        quantization_config=dict(QUANTIZATION_CONFIG) if fp8 else None,
    )
    config.save_pretrained(tmp)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in hf_state_items(model):
        for k, v in _encode(key, t, dtype, fp8):
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                _flush(shards, tmp)
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
    _flush(shards, tmp)
    _write_index(tmp, len(shards))
    for path in extra_files:
        shutil.copy(path, tmp)
    _swap_into_place(tmp, directory)


def _encode(key: str, t: torch.Tensor, dtype, fp8: bool):
    t = t.detach().cpu()
    if key.endswith("e_score_correction_bias"):
        yield key, t.float().contiguous().clone()
    elif fp8 and is_quantized_key(key):
        q, scale = block_quantize(t)
        yield key, q
        yield key + "_scale_inv", scale
    else:
        yield key, t.to(dtype or t.dtype).contiguous().clone()


def _flush(shards: list[dict[str, torch.Tensor]], tmp: str) -> None:
    """Write the last shard under a provisional name; _write_index names them at the end."""
    i = len(shards)
    save_file(
        shards[-1], os.path.join(tmp, f"shard-{i:05d}.safetensors"), metadata={"format": "pt"}
    )
    shards[-1] = {k: None for k in shards[-1]}  # free the tensors, keep the names


def _write_index(tmp: str, n: int) -> None:
    if n == 1:
        os.replace(os.path.join(tmp, "shard-00001.safetensors"), os.path.join(tmp, SINGLE_NAME))
        return
    weight_map, total = {}, 0
    for i in range(1, n + 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        src = os.path.join(tmp, f"shard-{i:05d}.safetensors")
        os.replace(src, os.path.join(tmp, final))
        with safe_open(os.path.join(tmp, final), framework="pt") as f:
            for k in f.keys():
                weight_map[k] = final
                sl = f.get_slice(k)
                total += _nbytes(sl.get_dtype(), sl.get_shape())
    with open(os.path.join(tmp, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
}


def _nbytes(dtype: str, shape: list[int]) -> int:
    n = _DTYPE_BYTES.get(dtype, 4)
    for s in shape:
        n *= s
    return n


def _swap_into_place(tmp: str, directory: str) -> None:
    """rename(tmp -> directory); an existing directory is moved aside first, then deleted."""
    old = None
    if os.path.exists(directory):
        old = f"{directory}.old-{os.getpid()}"
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
