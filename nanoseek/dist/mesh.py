"""The device mesh: W = dp x ep ranks, named ("dp", "ep"), ep the fast-varying dimension.

    rank = i_dp * ep + i_ep        e.g. W=8, ep=4:  dp group {0,4}, ep groups {0..3}, {4..7}

What each dimension does (DeepSeek-V3 trains the same way: EP spans data-parallel ranks,
[V3 §3.2]):
- data: every one of the W ranks reads a different slice of each global batch; attention, the
  dense FFNs, the router, embedding and head see only their rank's tokens (data parallel over W).
- ep: the routed experts are split into ep contiguous slices of E/ep; tokens travel to the rank
  holding their expert and back (all_to_all inside an ep group: consecutive ranks, so with
  ep <= GPUs per node the exchange stays inside a node).
- dp: the ranks holding the same expert slice. With `fsdp` (default) the non-expert weights are
  FSDP2-sharded over all W ranks (the flattened mesh) and each expert slice over its dp group;
  without, the weights are replicated and their gradients all-reduced (DDP-style).

So with 2 ranks: dp=2 ep=1 is plain FSDP; dp=1 ep=2 is expert parallelism with the dense part
FSDP-sharded over the same 2 ranks (or replicated with fsdp=false).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import init_device_mesh

from nanoseek.config import ConfigError


@dataclass(frozen=True)
class MeshShape:
    dp: int
    ep: int

    @property
    def world_size(self) -> int:
        return self.dp * self.ep


def mesh_shape(world_size: int, dp: int, ep: int, n_experts: int | None) -> MeshShape:
    """Check the options `dp` (0: world_size // ep) and `ep` against the world and the model.
    Everything here is known to every rank before the rendezvous: a bad mesh fails everywhere."""
    if ep < 1:
        raise ConfigError(f"option 'ep' must be >= 1, got {ep}")
    if dp < 0:
        raise ConfigError(f"option 'dp' must be >= 0 (0: world size / ep), got {dp}")
    if world_size % ep:
        raise ConfigError(
            f"option 'ep': {ep} expert-parallel ranks do not divide the world of {world_size} "
            "processes"
        )
    dp = dp or world_size // ep
    if dp * ep != world_size:
        raise ConfigError(
            f"mesh dp={dp} x ep={ep} = {dp * ep} ranks does not fit the world of {world_size} "
            "processes (dp x ep must equal --nproc-per-node x nodes; dp=0 picks it)"
        )
    if ep > 1 and not n_experts:
        raise ConfigError(f"option 'ep'={ep}: the model has no routed experts to distribute")
    if ep > 1 and n_experts % ep:
        raise ConfigError(
            f"option 'ep': {ep} expert-parallel ranks do not divide n_routed_experts="
            f"{n_experts} (each rank must hold the same number of experts)"
        )
    return MeshShape(dp, ep)


def build_mesh(shape: MeshShape, device: torch.device):
    """(2-D mesh ("dp", "ep"), 1-D mesh over all ranks for the non-expert weights)."""
    mesh = init_device_mesh(device.type, (shape.dp, shape.ep), mesh_dim_names=("dp", "ep"))
    world = mesh._flatten("dp_ep")  # private but stable since 2.6; torchtitan uses it too
    return mesh, world
