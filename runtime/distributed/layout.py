"""The parallel layout of `system.distributed`: how many processes replicate, shard and split
the experts, and the DeviceMesh of them. Imports no torch (plan uses it without).

World = pipeline_parallel x dp_replicate x dp_shard x expert_parallel processes, on a DeviceMesh
("dp_replicate", "dp_shard", "ep") (rank = (r * dp_shard + s) * expert_parallel + e), with
"dp_shard_ep" the flattened product of the last two; with pipeline_parallel > 1 a "pp" dimension
comes first (rank = ((p * dp_replicate + r) * dp_shard + s) * expert_parallel + e): the processes
of one stage are a contiguous block, a pipeline's processes are dp_replicate * dp_shard *
expert_parallel apart. dp_shard = expert_parallel = 1 is plain DDP.
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
PIPELINE_DIM = "pp"


class SystemConfigError(RuntimeError):
    """The `system` settings cannot run here (bad device, multi-process launch without DDP...)."""


@dataclass
class Layout:
    world: int
    dp_replicate: int
    dp_shard: int
    expert_parallel: int
    pipeline_parallel: int = 1

    @property
    def sharded(self) -> bool:
        """FSDP2 rather than DDP / a single process."""
        return self.dp_shard > 1 or self.expert_parallel > 1

    @property
    def pipelined(self) -> bool:
        return self.pipeline_parallel > 1

    @property
    def data_parallel(self) -> int:
        """Processes that read different data: all but the pipeline dimension."""
        return self.world // self.pipeline_parallel


def layout_for(dist_cfg: DistributedConfig, world: int) -> tuple[Layout, str | None]:
    """The layout of `world` processes and the problem with it (None when it is consistent).
    dp_replicate null means whatever the other degrees leave of the world."""
    S, E = dist_cfg.dp_shard, dist_cfg.expert_parallel
    R, P = dist_cfg.dp_replicate, dist_cfg.pipeline_parallel
    pipeline = f"{PATH.system.distributed.pipeline_parallel} ({P}) * " if P > 1 else ""
    if R is None:
        if world % (P * S * E):
            problem: str | None = (
                f"{pipeline}{PATH.system.distributed.dp_shard} ({S}) * "
                f"{PATH.system.distributed.expert_parallel} ({E}) does not divide {world} processes"
            )
            return Layout(world, 1, S, E, P), problem
        R = world // (P * S * E)
    problem = None
    if P * R * S * E != world:
        problem = (
            f"{pipeline}{PATH.system.distributed.dp_replicate} ({R}) * {PATH.system.distributed.dp_shard} ({S}) * "
            f"{PATH.system.distributed.expert_parallel} ({E}) = {P * R * S * E}, but {world} processes"
        )
    return Layout(world, R, S, E, P), problem


def resolve_layout(dist_cfg: DistributedConfig, world: int) -> Layout:
    """The layout of `world` processes (DistributedConfig); a SystemConfigError naming the fields when
    the degrees do not multiply to the world size."""
    layout, problem = layout_for(dist_cfg, world)
    if problem is not None:
        raise SystemConfigError(f"launched with WORLD_SIZE={world}: {problem}")
    return layout


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    shape: tuple[int, ...] = (layout.dp_replicate, layout.dp_shard, layout.expert_parallel)
    names: tuple[str, ...] = MESH_DIMS
    if layout.pipelined:
        shape, names = (layout.pipeline_parallel, *shape), (PIPELINE_DIM, *names)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
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
    stages: dict[int, range] | None = None  # pipelined: stage index -> its layers, held here

    @property
    def sharded(self) -> bool:
        return self.layout.sharded


def stage_layers(
    n_layers: int, stages: int, split: list[int] | tuple[int, ...] = ()
) -> list[range]:
    """The layers of each pipeline stage, in order: `split` gives the first layer of every stage
    after the first (system.distributed.pipeline_split); empty spreads them evenly, the earlier
    stages taking one more where they do not divide."""
    if split:
        starts = [0, *split, n_layers]
    else:
        base, extra = divmod(n_layers, stages)
        sizes = [base + (1 if i < extra else 0) for i in range(stages)]
        starts = [sum(sizes[:i]) for i in range(stages + 1)]
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def stage_ranks(schedule_is_v: bool, pipeline_parallel: int, stages_per_rank: int) -> list[int]:
    """Which pipeline rank holds each stage: looped (stage s on rank s mod P) for one stage per
    rank and the interleaved schedule; V-shaped for zbv and dualpipev (stages 0 and 2P - 1 on rank
    0, P - 1 and P on rank P - 1)."""
    P = pipeline_parallel
    stages = P * stages_per_rank
    if schedule_is_v:
        return [s if s < P else 2 * P - 1 - s for s in range(stages)]
    return [s % P for s in range(stages)]
