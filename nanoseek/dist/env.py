"""The process group from torchrun's environment: which rank am I, on which device, how to talk.

    torchrun --nproc-per-node 2 -m nanoseek pretrain --out runs/tiny
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 \
        --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m nanoseek pretrain ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every worker. None of
them set: a plain single-process run. Some but not all: an error naming the missing ones (a
hand-made launch that would otherwise hang in the rendezvous).

Footgun: never default to CUDA. The device is an option (`cpu` default); `cuda`
maps rank -> `cuda:LOCAL_RANK` explicitly, and the backend follows the device: gloo for CPU,
NCCL for CUDA. Every check here runs before the rendezvous, from inputs all ranks share, so a bad
launch fails on every rank at once instead of leaving the others waiting for a peer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from nanoseek.config import ConfigError

RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEVICES = ("cpu", "cuda")
T = TypeVar("T")


class LaunchError(ConfigError):
    """A distributed launch that cannot work (environment, device); the message says why."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int  # global rank, 0 .. world_size-1
    world_size: int
    local_rank: int  # rank on this node: picks the GPU
    master_addr: str
    master_port: int


def read_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The torchrun variables, checked; None when none is set (a single-process run)."""
    environ = os.environ if environ is None else environ
    present = [v for v in RENDEZVOUS_VARS if environ.get(v)]
    if not present:
        return None
    missing = [v for v in RENDEZVOUS_VARS if not environ.get(v)]
    if missing:
        raise LaunchError(
            f"distributed launch: environment variable {', '.join(missing)} not set "
            f"(found {', '.join(present)}); start with `torchrun --nproc-per-node N -m nanoseek "
            f"...`, or set all of {', '.join(RENDEZVOUS_VARS)}"
        )
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise LaunchError(
                f"distributed launch: {name}={environ[name]!r} is not an integer"
            ) from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or not 0 <= local <= rank:
        raise LaunchError(
            f"distributed launch: need WORLD_SIZE >= 1, 0 <= LOCAL_RANK <= RANK < WORLD_SIZE; "
            f"got RANK={rank} LOCAL_RANK={local} WORLD_SIZE={world}"
        )
    if not 0 < values["MASTER_PORT"] < 65536:
        raise LaunchError(f"distributed launch: MASTER_PORT={values['MASTER_PORT']} out of range")
    return LaunchEnv(rank, world, local, environ["MASTER_ADDR"], values["MASTER_PORT"])


def pick_device(kind: str, local_rank: int) -> torch.device:
    """`cpu`, or `cuda:LOCAL_RANK` (checked against the visible GPUs)."""
    if kind not in DEVICES:
        raise ConfigError(f"option 'device' must be one of {DEVICES}, got {kind!r}")
    if kind == "cpu":
        return torch.device("cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank >= n:
        raise LaunchError(
            f"device 'cuda': LOCAL_RANK {local_rank} needs GPU {local_rank}, but {n} are visible "
            "(use --nproc-per-node <= the GPUs per node, or --device=cpu)"
        )
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(env: LaunchEnv, device: torch.device, timeout_s: float) -> bool:
    """Join the rendezvous (env:// from the torchrun variables); returns whether we created the
    group (and so must destroy it). An existing group (a caller set one up) is reused."""
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise LaunchError("an existing process group disagrees with RANK/WORLD_SIZE")
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend_for(device),
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
        # binds NCCL's communicator to this GPU at once (no lazy guess of the device later)
        device_id=device if device.type == "cuda" else None,
    )
    return True


def main_first(fn: Callable[[], T], rank: int, others: bool = True) -> T | None:
    """Run `fn` on rank 0 first (it may write shared files: tokenizer, token shards), then, with
    `others`, on the other ranks, which find the files and only read them. A failure on rank 0
    is re-raised on every rank instead of leaving them waiting for it."""
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - forwarded to the other ranks, then re-raised
            dist.broadcast_object_list([f"{type(e).__name__} on rank 0: {e}"], src=0)
            raise
        dist.broadcast_object_list([None], src=0)
        return result
    status = [None]
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise LaunchError(status[0])
    return fn() if others else None
