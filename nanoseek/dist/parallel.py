"""What the trainer asks of "the other ranks": one object, two implementations.

`SingleProcess` is the plain path: every reduction is the identity and clipping is
torch.nn.utils.clip_grad_norm_, so a run without torchrun behaves exactly as before.
`Distributed` owns the process group and the mesh (nanoseek/dist/mesh.py) and implements the same
methods with collectives. `launch(opts, n_experts)` picks one from the environment:

    with launch(opts, n_experts) as par:
        model = par.parallelize(model, opts.precision)
        trainer = Trainer(model, opts, ..., parallel=par)
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nanoseek.config import ConfigError
from nanoseek.dist.env import LaunchEnv, init_process_group, main_first, pick_device, read_env
from nanoseek.dist.expert_parallel import shard_experts
from nanoseek.dist.fsdp import all_reduce_grads, apply_fsdp, clip_grad_norm_
from nanoseek.dist.mesh import MeshShape, build_mesh, mesh_shape
from nanoseek.fp8 import convert_for_fp8

T = TypeVar("T")


class SingleProcess:
    distributed = False
    rank, world_size, is_main = 0, 1, True
    all_reduce_ = None  # balance.gather_loads: nothing to sum

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")

    def parallelize(self, model, precision: str):
        """The model this rank trains: FP8 layers swapped in for precision=fp8, on the device."""
        _convert_for(precision, model, self.is_main)
        return model.to(self.device)

    def to_device(self, batch):
        return batch if self.device.type == "cpu" else _to(batch, self.device)

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast(self, obj: T) -> T:
        return obj

    def barrier(self) -> None:
        pass

    def main_first(self, fn: Callable[[], T]) -> T:
        return fn()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        return fn()

    def grad_sync(self, model, enabled: bool) -> None:
        pass

    def reduce_grads(self, model) -> None:
        pass

    def clip_grad_norm_(self, model, max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()


class Distributed(SingleProcess):
    distributed = True

    def __init__(self, env: LaunchEnv, device: torch.device, shape: MeshShape, fsdp: bool):
        super().__init__(device)
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self.is_main = env.rank == 0
        self.shape, self.fsdp = shape, fsdp
        self.mesh, self.world_mesh = build_mesh(shape, device)
        self.dp_group = self.mesh["dp"].get_group()
        self.ep_group = self.mesh["ep"].get_group()
        self.expert_params: set[int] = set()  # ids of the rank's expert-slice parameters

    def __repr__(self) -> str:
        return (
            f"Distributed(rank {self.rank}/{self.world_size}, {self.device}, "
            f"dp={self.shape.dp} x ep={self.shape.ep}, fsdp={self.fsdp})"
        )

    # ---------------------------------------------------------------- the model
    def parallelize(self, model, precision: str):
        """Move to the rank's device, keep the rank's expert slices (ep > 1), then shard the
        weights with FSDP2 (fsdp) or keep them replicated. Every rank must pass the same,
        identically initialised model (seed first): the slices are cut from it."""
        _convert_for(precision, model, self.is_main)  # before sharding: FSDP wraps FP8 layers
        model.to(self.device)
        experts = shard_experts(model, self.ep_group) if self.shape.ep > 1 else []
        if self.fsdp:
            apply_fsdp(model, self.world_mesh, self.mesh["dp"], experts, precision)
        self.expert_params = {id(p) for m in experts for p in m.parameters()}
        return model

    def to_device(self, batch):
        return _to(batch, self.device)

    # ---------------------------------------------------------------- reductions
    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def broadcast(self, obj: T) -> T:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def main_first(self, fn: Callable[[], T]) -> T:
        """`fn` on rank 0, then on the others (rank 0 writes shared files, the rest read)."""
        return main_first(fn, self.rank)

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """`fn` on rank 0 only; the others wait for it and fail with it."""
        return main_first(fn, self.rank, others=False)

    # ---------------------------------------------------------------- gradients
    def grad_sync(self, model, enabled: bool) -> None:
        """FSDP: reduce-scatter only after the step's last micro-batch (accumulate locally)."""
        if self.fsdp:
            model.set_requires_gradient_sync(enabled)

    def reduce_grads(self, model) -> None:
        """Replicated weights (fsdp off): sum gradients over the ranks holding copies - all
        ranks for the dense weights, the dp group for an expert slice."""
        if self.fsdp:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        all_reduce_grads([p for p in params if id(p) not in self.expert_params])
        if self.shape.dp > 1:
            experts = [p for p in params if id(p) in self.expert_params]
            all_reduce_grads(experts, group=self.dp_group)

    def clip_grad_norm_(self, model, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.requires_grad]
        return clip_grad_norm_(params, [self._copies(p) for p in params], max_norm)

    def _copies(self, p) -> int:
        """How many ranks hold the same values as this rank's `p` (shards: 1)."""
        if isinstance(p, DTensor):
            return 1
        return self.shape.dp if id(p) in self.expert_params else self.world_size


def _convert_for(precision: str, model, verbose: bool) -> None:
    if precision == "fp8":  # [V3 §3.3]
        convert_for_fp8(model, verbose)


def _to(batch, device: torch.device):
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device)


@contextlib.contextmanager
def launch(opts: Any, n_experts: int | None) -> Iterator[SingleProcess]:
    """`Distributed` under torchrun (process group up on entry, down on exit), else
    `SingleProcess`. All checks run before the rendezvous, so they fail on every rank."""
    env = read_env()
    if env is None:
        if opts.ep > 1 or opts.dp > 1:
            raise ConfigError(
                f"options dp={opts.dp}, ep={opts.ep} need several processes: launch with "
                "`torchrun --nproc-per-node N -m nanoseek ...`"
            )
        yield SingleProcess(pick_device(opts.device, 0))
        return
    shape = mesh_shape(env.world_size, opts.dp, opts.ep, n_experts)
    if opts.batch_size % env.world_size:
        raise ConfigError(
            f"option 'batch_size': {opts.batch_size} sequences per micro-batch (all ranks "
            f"together) do not split over {env.world_size} processes"
        )
    device = pick_device(opts.device, env.local_rank)
    owns_group = init_process_group(env, device, opts.dist_timeout_s)
    ok = False
    try:
        yield Distributed(env, device, shape, opts.fsdp)
        ok = True
    finally:
        if owns_group:
            shutdown(ok)


def shutdown(synchronize: bool) -> None:
    """Destroy every process group while the interpreter is fully alive. After a success, wait
    for the peers first, and free the modules that still reference the groups (FSDP states sit
    in reference cycles): gloo's worker threads must not outlive them into interpreter teardown,
    where freeing their tensors aborts the process ("terminate called without an active
    exception")."""
    if synchronize:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
