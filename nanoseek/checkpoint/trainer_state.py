"""Training checkpoints: an HF model directory plus the trainer state, written atomically.

    OUT/checkpoints/step-000200/   config.json, model.safetensors, tokenizer files,
                                   trainer_state.json (step, data position, RNG states, options,
                                   optimizer layout and hyper-parameters),
                                   trainer_state.tensors (its tensors, in safetensors format:
                                   AdamW moments, torch RNG state)

The whole directory is assembled under a temporary name and renamed into place, so a crash at
any point leaves either the previous checkpoints or the new one complete, never a torn one.

No pickle anywhere: people share checkpoints and resume other people's runs, and unpickling a
file can run any code in it. JSON holds the plain values, tagged where JSON has no type of its
own (tuples, dicts with non-string keys, numpy arrays; tensors by name in the safetensors
file). A `trainer_state.pt` of older versions is refused, never unpickled.

A sharded run writes the same trainer-state files beside its DCP shards
(nanoseek/dist/checkpoint.py); choosing the checkpoint a run resumes from, setting aside broken
ones, is nanoseek/train/run_dir.py's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nanoseek.checkpoint.io import CheckpointError, save
from nanoseek.fsio import is_write_failure, write_error

STATE_NAME = "trainer_state.json"  # its presence marks a checkpoint complete
# safetensors format under another suffix: loaders that take every `*.safetensors` of a model
# directory for weights (ours, vLLM's) must not read the optimizer moments as weights
TENSORS_NAME = "trainer_state.tensors"
LEGACY_NAME = "trainer_state.pt"
FORMAT = "nanoseek-trainer-state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _check_rng(state: Any, path: str) -> None:
    """Set the saved RNG states once and put the current ones back: a malformed field fails
    here, naming the file, instead of mid-resume."""
    current = rng_state()
    try:
        set_rng_state(state)
    except Exception as e:  # noqa: BLE001 - any malformed value: TypeError, ValueError, KeyError
        raise CheckpointError(f"{path}: field 'rng' is not a valid RNG state ({e})") from None
    finally:
        set_rng_state(current)


# ------------------------------------------------------------------------ encoding
def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able tree, tensors by name) for a trainer state of plain values and tensors."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, where: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biuf":
                raise TypeError(f"trainer state '{where}': numpy arrays of {x.dtype} not stored")
            return {"__ndarray__": x.tolist(), "dtype": x.dtype.str}
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{where}.{k}") for k, v in x.items()}
            return {"__items__": [[enc(k, where), enc(v, f"{where}.{k}")] for k, v in x.items()]}
        raise TypeError(f"trainer state '{where}': a {type(x).__name__} cannot be stored")

    return enc(state, "state"), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_state`; ValueError on anything it would not have written."""
    if isinstance(tree, list):
        return [decode_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        if tree["__tensor__"] not in tensors:
            raise ValueError(f"tensor {tree['__tensor__']!r} is missing")
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        dtype = np.dtype(str(tree["dtype"]))
        if dtype.kind not in "biuf":
            raise ValueError(f"numpy dtype {dtype} is not numeric")
        return np.array(tree["__ndarray__"], dtype=dtype)
    if "__tuple__" in tree:
        return tuple(decode_state(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in tree["__items__"]}
    return {k: decode_state(v, tensors) for k, v in tree.items()}


def write_state(state: dict[str, Any], directory: str) -> list[str]:
    """`state` as trainer_state.json + trainer_state.tensors in `directory` (a staging
    folder: the caller publishes it atomically); returns the two paths."""
    tree, tensors = encode_state(state)
    json_path, tensors_path = (os.path.join(directory, n) for n in (STATE_NAME, TENSORS_NAME))
    save_file(tensors, tensors_path, metadata={"format": FORMAT})
    with open(json_path, "w") as f:
        json.dump({"format": FORMAT, "version": 1, "state": tree}, f)
    return [json_path, tensors_path]


def load_state(checkpoint_dir: str) -> dict[str, Any]:
    """The trainer state of a checkpoint; CheckpointError naming the file when it is missing,
    of the old pickle format, truncated or malformed."""
    json_path = os.path.join(checkpoint_dir, STATE_NAME)
    tensors_path = os.path.join(checkpoint_dir, TENSORS_NAME)
    if not os.path.exists(json_path):
        legacy = os.path.join(checkpoint_dir, LEGACY_NAME)
        if os.path.exists(legacy):
            raise CheckpointError(
                f"{legacy}: trainer state in the old pickle format, which nanoseek no longer "
                "loads (unpickling a file can run code in it)"
            )
        raise CheckpointError(f"{json_path}: no such file")
    try:
        with open(json_path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{json_path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise CheckpointError(f"{json_path}: corrupt or truncated ({e})") from None
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT and "state" in doc):
        raise CheckpointError(f"{json_path}: not a nanoseek trainer state")
    try:
        tensors = load_file(tensors_path)
    except FileNotFoundError:
        raise CheckpointError(f"{tensors_path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is unreadable
        raise CheckpointError(f"{tensors_path}: corrupt or truncated ({e})") from None
    try:
        state = decode_state(doc["state"], tensors)
    except (TypeError, ValueError, KeyError, RecursionError) as e:
        raise CheckpointError(f"{json_path}: malformed ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{json_path}: malformed (the state is not an object)")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{json_path}: field 'step' is not a step number: {step!r}")
    _check_rng(state.get("rng"), json_path)
    return state


# ------------------------------------------------------------------------ discovery
def step_dirs(out_dir: str) -> list[tuple[int, str]]:
    """Every OUT/checkpoints/step-N folder, complete or not, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def checkpoint_dirs(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under OUT/checkpoints, oldest first."""
    return [(s, p) for s, p in step_dirs(out_dir) if os.path.exists(os.path.join(p, STATE_NAME))]


def latest_checkpoint(out_dir: str) -> str | None:
    found = checkpoint_dirs(out_dir)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------ save
def prune(out_dir: str, keep_last: int) -> None:
    for _, path in checkpoint_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    out_dir: str, step: int, model, state: dict[str, Any], extra_files=(), keep_last: int = 2
) -> str:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:06d}")
    # the trainer state travels as extra files of the one atomic model save
    staging = os.path.join(root, f".state-{os.getpid()}")
    try:
        try:
            os.makedirs(staging, exist_ok=True)
            files = write_state(state, staging)
        except Exception as e:  # a full disk, a read-only folder: say where, keep the rest
            if is_write_failure(e):
                then = "; the checkpoints saved before are unchanged"
                raise write_error(final, e, "cannot save the checkpoint", then) from None
            raise
        save(model, final, extra_files=[*extra_files, *files])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prune(out_dir, keep_last)
    return final
