"""Training checkpoints: an HF model directory plus `trainer_state.pt`, written atomically.

    OUT/checkpoints/step-000200/   config.json, model.safetensors, tokenizer files,
                                   trainer_state.pt (optimizer, step, data position, RNG states)

The whole directory is assembled under a temporary name and renamed into place, so a crash at
any point leaves either the previous checkpoints or the new one complete, never a torn one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

from nanoseek.checkpoint.io import save

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def checkpoint_dirs(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under OUT/checkpoints, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.exists(os.path.join(path, STATE_NAME)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> str | None:
    found = checkpoint_dirs(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    out_dir: str, step: int, model, state: dict[str, Any], extra_files=(), keep_last: int = 2
) -> str:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`."""
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    # the trainer state travels as an extra file of the one atomic model save
    staging = os.path.join(root, f".state-{os.getpid()}")
    os.makedirs(staging, exist_ok=True)
    try:
        torch.save(state, os.path.join(staging, STATE_NAME))
        save(model, final, extra_files=[*extra_files, os.path.join(staging, STATE_NAME)])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for _, path in checkpoint_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_state(checkpoint_dir: str) -> dict[str, Any]:
    return torch.load(os.path.join(checkpoint_dir, STATE_NAME), weights_only=False)
