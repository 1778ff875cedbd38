"""Checkpoints of a sharded run: torch.distributed.checkpoint (DCP) shards, resumable at any world
size, plus the consolidated Hugging Face export gathered to rank 0.

    OUT/checkpoints/step-000200/  dcp/ (.metadata, __<rank>_0.distcp), trainer_state.json and
                                  .tensors, config.json, tokenizer files

Layout of the sharded state (one flat dict, the same keys whatever the mesh):
- `model.<name>`: every persistent tensor; FSDP shards are DTensors, which DCP re-slices for any
  other world size;
- routed experts are stored per expert, `model.<...>.experts.gate_up_proj.<e>` (global index e):
  an expert always lives whole on one rank (ep slices, FSDP rows), so N ranks write the rows they
  own and M ranks - or one process - read the rows they need;
- `optim.<param name>.<state>` likewise (AdamW moments per expert; `step` once per parameter).

Checkpoints written by one process (the HF directory + trainer state of
nanoseek/checkpoint/trainer_state.py) resume on M ranks too (`load_full`), and a sharded one on
one process (`load_sharded` without a process group): a run saved with N processes resumes
with M.
Footgun: on several nodes OUT must be a shared filesystem (each rank writes its own shard file).
Reading goes through nanoseek/dist/safe_dcp.py: DCP's own reader would unpickle the index and
non-tensor values, running whatever code a crafted checkpoint holds.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from nanoseek.checkpoint.io import CheckpointError, build_empty, load, save
from nanoseek.checkpoint.trainer_state import prune, write_state
from nanoseek.config import ModelConfig
from nanoseek.dist.expert_parallel import ExpertParallelExperts
from nanoseek.dist.safe_dcp import SafePlanner, SafeReader, read_metadata
from nanoseek.model.moe import RoutedExperts

SHARDS = "dcp"


def is_sharded(path: str) -> bool:
    return os.path.exists(os.path.join(path, SHARDS, ".metadata"))


# ------------------------------------------------------------------------ the flat state
def _expert_first(model) -> dict[str, int]:
    """Parameter name -> global index of the first expert of the rank's (unsharded) slice."""
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, (RoutedExperts, ExpertParallelExperts)):
            first = getattr(m, "first", 0)
            for p in ("gate_up_proj", "down_proj"):
                out[f"{prefix}.{p}"] = first
    return out


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(local rows, index of the first local row in t's global dim 0)."""
    if isinstance(t, DTensor):
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), offset[0]
    return t, 0


def _put(out: dict, key: str, t: Any, first: int | None) -> None:
    if first is None:
        out[key] = t
        return
    rows, offset = _rows(t)
    for r in range(rows.shape[0]):
        out[f"{key}.{first + offset + r}"] = rows[r]


def sharded_state(model, optimizer=None) -> dict[str, Any]:
    """This rank's view of the flat state (tensors alias the live weights and moments, so DCP
    loads into them in place)."""
    first = _expert_first(model)
    out: dict[str, Any] = {}
    for name, t in model.state_dict().items():
        _put(out, f"model.{name}", t, first.get(name))
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for p, state in optimizer.state.items():
            name = names[id(p)]
            for k, v in state.items():
                per_expert = isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape
                _put(out, f"optim.{name}.{k}", v, first.get(name) if per_expert else None)
    return out


def _restore_objects(model, optimizer, flat: dict[str, Any]) -> None:
    """Non-tensor optimizer state (e.g. an int step) comes back as a new object in `flat`."""
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                state[k] = flat[f"optim.{names[id(p)]}.{k}"]


@torch.no_grad()
def init_optimizer_state(optimizer) -> None:
    """Create the moments (a step with zero gradients at lr 0 changes no weight), so that a
    checkpoint can be loaded into them."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(optimizer.state.get(p) for p in params):
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


# ------------------------------------------------------------------------ save / load
def save_sharded(
    out_dir: str, step: int, model, optimizer, state: dict, extra_files, keep_last: int, par
) -> str:
    """Write OUT/checkpoints/step-N from every rank: shards under a temporary name, then rank 0
    adds the trainer state (what marks a checkpoint complete), config and tokenizer, and renames."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:06d}")
    staging = os.path.join(root, f".step-{step:06d}.partial")

    def fresh_staging():
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)

    par.on_main(fresh_staging)
    dcp.save(sharded_state(model, optimizer), checkpoint_id=os.path.join(staging, SHARDS))

    def finish():
        write_state(state, staging)
        model.config.save_pretrained(staging)
        for path in extra_files:
            shutil.copy(path, staging)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(staging, final)
        prune(out_dir, keep_last)

    par.on_main(finish)
    return final


def load_sharded(path: str, model, optimizer=None) -> None:
    """Fill the model (and optimizer) of this rank - sharded, or a plain one-process model -
    from a sharded checkpoint written at any world size."""
    checkpoint = os.path.join(path, SHARDS)
    if optimizer is not None:
        init_optimizer_state(optimizer)
    flat = sharded_state(model, optimizer)
    if optimizer is not None:  # parameters that never had a gradient (MTP modules in GRPO, in
        # SFT with mtp_lambda=0) have no moments in the checkpoint: none after loading either
        saved = set(read_metadata(checkpoint).state_dict_metadata)
        stepped = set()  # keys: optim.{param}.{state}[.{expert}]
        for k in saved:
            if k.startswith("optim."):
                stepped.update(k[len("optim.") :].rsplit(".", n)[0] for n in (1, 2))
        names = {id(p): n for n, p in model.named_parameters()}
        for p in list(optimizer.state):
            if names[id(p)] not in stepped:
                del optimizer.state[p]
        flat = {k: v for k, v in flat.items() if not k.startswith("optim.") or k in saved}
    with warnings.catch_warnings():  # one process: DCP notes it runs without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(flat, storage_reader=SafeReader(checkpoint), planner=SafePlanner())
        except CheckpointException as e:  # DCP wraps each rank's error: show ours in one line
            errors = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointError)]
            if not errors:
                raise
            msg = str(errors[0])
            raise CheckpointError(msg if checkpoint in msg else f"{checkpoint}: {msg}") from None
    if optimizer is not None:
        _restore_objects(model, optimizer, flat)


@torch.no_grad()
def load_full(path: str, model, optimizer, optimizer_state: dict) -> None:
    """A one-process checkpoint (HF weights + `optimizer.state_dict()`) into this rank's shards.
    Every rank reads the whole checkpoint and keeps its part."""
    full_model = load(path, dtype=torch.float32)
    full = sharded_state(full_model)
    # the one-process optimizer numbers its parameters in param_groups order, as ours does
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    first = _expert_first(full_model)
    for i, state in optimizer_state["state"].items():
        name = names[id(params[int(i)])]
        for k, v in state.items():
            per_expert = isinstance(v, torch.Tensor) and v.dim() > 0 and name in first
            _put(full, f"optim.{name}.{k}", v, first[name] if per_expert else None)
    init_optimizer_state(optimizer)
    target = sharded_state(model, optimizer)
    for key, dest in target.items():
        if key not in full:
            raise KeyError(f"{path}: the checkpoint has no '{key}'")
        if isinstance(dest, torch.Tensor):
            _copy_local(dest, full[key])
        else:
            target[key] = full[key]
    _restore_objects(model, optimizer, target)


def _copy_local(dest: torch.Tensor, full: torch.Tensor) -> None:
    if isinstance(dest, DTensor):
        shape, offset = compute_local_shape_and_global_offset(
            dest.shape, dest.device_mesh, dest.placements
        )
        part = full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
        dest.to_local().copy_(part)
    else:
        dest.copy_(full)


# ------------------------------------------------------------------------ consolidated export
@torch.no_grad()
def full_state_dict(model, par, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 (CPU; on every rank with `everywhere`), None
    elsewhere: FSDP shards all-gathered, expert slices gathered over their ep group. One tensor
    at a time, in the same order on every rank (each gather is a collective)."""
    ep_params = {
        f"{prefix}.{p}"
        for prefix, m in model.named_modules()
        if isinstance(m, ExpertParallelExperts)
        for p in ("gate_up_proj", "down_proj")
    }
    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if name in ep_params:
            parts = [torch.empty_like(t) for _ in range(par.shape.ep)]
            dist.all_gather(parts, t.contiguous(), group=par.ep_group)
            t = torch.cat(parts)
        if par.is_main or everywhere:
            out[name] = t.detach().cpu()
    return out if par.is_main or everywhere else None


def export_hf(model, directory: str, extra_files, par) -> None:
    """The consolidated HF directory of a (possibly sharded) model, written by rank 0."""
    if not par.distributed:
        save(model, directory, extra_files=extra_files)
        return
    state = full_state_dict(model, par)

    def write():
        full = build_empty(model.config, torch.float32, "cpu")
        full.load_state_dict(state)
        save(full, directory, extra_files=extra_files)

    par.on_main(write)


def consolidate(checkpoint_dir: str, out_dir: str) -> None:
    """One process: a sharded checkpoint -> a HF directory (weights only), e.g.
    `python -m nanoseek.dist.checkpoint runs/x/checkpoints/step-000200 runs/x/step200-hf`."""
    model = build_empty(ModelConfig.from_pretrained(checkpoint_dir), torch.float32, "cpu")
    load_sharded(checkpoint_dir, model)
    extra = [
        os.path.join(checkpoint_dir, f)
        for f in ("tokenizer.json", "tokenizer_config.json")
        if os.path.exists(os.path.join(checkpoint_dir, f))
    ]
    save(model, out_dir, extra_files=extra)


def adapt_data_state(state: Any, dataset) -> Any:
    """A loader position saved at another world size, in this run's terms: `batch_size` is the
    global micro-batch, so W ranks x B/W rows read the same windows in the same order as one
    process x B rows, and the position (batches consumed) carries over unchanged."""
    if not (isinstance(state, dict) and "world_size" in state and hasattr(dataset, "world_size")):
        return state
    if state["batch_size"] * state["world_size"] == dataset.batch_size * dataset.world_size:
        state = {**state, "batch_size": dataset.batch_size, "world_size": dataset.world_size}
    return state


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m nanoseek.dist.checkpoint CHECKPOINT_DIR OUT_DIR")
    consolidate(sys.argv[1], sys.argv[2])
    print(f"wrote {sys.argv[2]}")
