"""Run a function in N fresh processes that form a gloo process group, with a hard timeout.

Each worker gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
on a free port), so code under test sees exactly what `torchrun` would give it. A worker's
exception fails the test with its traceback; a hang fails it after `timeout` seconds, and the
workers (only ours, by pid) are killed.
"""

from __future__ import annotations

import os
import socket
import time

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _entry(rank, fn, world_size, port, args):
    os.environ.update(torchrun_env(rank, world_size, port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 workers on a 2-core machine
    import torch

    torch.set_num_threads(1)
    fn(rank, world_size, *args)


def spawn(fn, world_size: int, *args, timeout: float = 120.0) -> None:
    """fn(rank, world_size, *args) in `world_size` processes; fn must be importable."""
    ctx = mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__}: workers still running after {timeout} s (hang?)")
