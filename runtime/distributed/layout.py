"""The parallel layout of `system.distributed`: how many processes replicate, shard and split
the experts, and the DeviceMesh of them. Imports no torch (plan uses it without).

World = dp_replicate x dp_shard x expert_parallel processes, on a 3-D DeviceMesh
("dp_replicate", "dp_shard", "ep") (rank = (r * dp_shard + s) * expert_parallel + e), with
"dp_shard_ep" the flattened product of the last two. dp_shard = expert_parallel = 1 is plain DDP.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from generated import PATH
from generated.config import DistributedConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("dp_replicate", "dp_shard", "ep")


class SystemConfigError(RuntimeError):
    """The `system` settings cannot run here (bad device, multi-process launch without DDP...)."""


@dataclass
class Layout:
    world: int
    dp_replicate: int
    dp_shard: int
    expert_parallel: int

    @property
    def sharded(self) -> bool:
        """FSDP2 (and sharded checkpoints) rather than DDP / a single process."""
        return self.dp_shard > 1 or self.expert_parallel > 1


def layout_for(dist_cfg: DistributedConfig, world: int) -> tuple[Layout, str | None]:
    """The layout of `world` processes and the problem with it (None when it is consistent).
    dp_replicate null means whatever the other degrees leave of the world."""
    S, E = dist_cfg.dp_shard, dist_cfg.expert_parallel
    R = dist_cfg.dp_replicate
    if R is None:
        if world % (S * E):
            problem: str | None = (
                f"{PATH.system.distributed.dp_shard} ({S}) * {PATH.system.distributed.expert_parallel} "
                f"({E}) does not divide {world} processes"
            )
            return Layout(world, 1, S, E), problem
        R = world // (S * E)
    problem = None
    if R * S * E != world:
        problem = (
            f"{PATH.system.distributed.dp_replicate} ({R}) * {PATH.system.distributed.dp_shard} ({S}) * "
            f"{PATH.system.distributed.expert_parallel} ({E}) = {R * S * E}, but {world} processes"
        )
    return Layout(world, R, S, E), problem


def resolve_layout(dist_cfg: DistributedConfig, world: int) -> Layout:
    """The layout of `world` processes (DistributedConfig); a SystemConfigError naming the fields when
    the degrees do not multiply to the world size."""
    layout, problem = layout_for(dist_cfg, world)
    if problem is not None:
        raise SystemConfigError(f"launched with WORLD_SIZE={world}: {problem}")
    return layout


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    shape = (layout.dp_replicate, layout.dp_shard, layout.expert_parallel)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    mesh["dp_shard", "ep"]._flatten("dp_shard_ep")
    return mesh


def submesh(mesh: DeviceMesh, *names: str) -> DeviceMesh:
    # slicing a flattened dimension from the root warns of a future deprecation; it is the
    # documented way in this torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mesh[names[0]] if len(names) == 1 else mesh[names]


def fsdp_mesh(mesh: DeviceMesh, replicate: int, shard_dim: str) -> DeviceMesh:
    """1-D shard mesh, or the 2-D (replicate, shard) mesh of HSDP."""
    return submesh(mesh, "dp_replicate", shard_dim) if replicate > 1 else submesh(mesh, shard_dim)


@dataclass
class Parallelism:
    """What a model family's parallelize() did: the layout and the mesh (None without FSDP)."""

    layout: Layout
    mesh: object = None

    @property
    def sharded(self) -> bool:
        return self.layout.sharded
