"""The parallel layout of `system.distributed`: DeviceMesh, expert parallelism, activation
checkpointing and FSDP2 (`fully_shard` per block, then the whole model), all from torch.distributed.

World = dp_replicate x dp_shard x expert_parallel processes, on a 3-D DeviceMesh
("dp_replicate", "dp_shard", "ep") (rank = (r * dp_shard + s) * expert_parallel + e). Every process
reads its own slice of the global batch (runtime/components/data.py), whatever the layout.

  * dp_shard = expert_parallel = 1: plain DDP (runtime/distributed/utils.py), unchanged.
  * otherwise FSDP2. The non-expert weights of each block (attention, norms, router, shared
    experts, dense MLP) are sharded over the dp_shard x expert_parallel processes ("dp_shard_ep",
    a flattened mesh dimension) and replicated over dp_replicate (HSDP when that is > 1); the routed
    experts are first split over "ep" (runtime/distributed/expert_parallel.py), then sharded by FSDP over
    "dp_shard" (and replicated over "dp_replicate") when that group has more than one process.
    Embedding, head, norms and the MTP projections belong to the root `fully_shard`.
  * activation checkpointing (`none` | `selective` | `full`) turns on the blocks' own recomputation
    (runtime/models/deepseek_v3/model.py: Block.recompute, torch.utils.checkpoint per half block; state-dict names
    unchanged); it also applies without FSDP.

Mixed precision: `param_dtype` is the dtype FSDP gathers weights in, `reduce_dtype` that of the
gradient reduction; the sharded master weights and AdamW state stay float32.

clip_grad_norm handles parameters on different meshes (experts vs the rest), which torch's own
clip_grad_norm_ does not: one all_reduce of the squared norms' shares.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn

from generated import PATH
from generated.config import Config, DistributedConfig
from generated.names import ActivationCheckpointing
from runtime.distributed.utils import DistInfo, SystemConfigError, slow_cpu_dtype
from runtime.models.deepseek_v3.cost import Layout, layout_for
from runtime.utils.registry import DTYPES

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule

    from runtime.models.deepseek_v3.model import Block, Transformer

MESH_DIMS = ("dp_replicate", "dp_shard", "ep")


def resolve_layout(dist_cfg: DistributedConfig, world: int) -> Layout:
    """The layout of `world` processes (DistributedConfig); a SystemConfigError naming the fields when
    the degrees do not multiply to the world size (the arithmetic is runtime/models/deepseek_v3/cost.py's)."""
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


def _submesh(mesh: DeviceMesh, *names: str) -> DeviceMesh:
    # slicing a flattened dimension from the root warns of a future deprecation; it is the
    # documented way in this torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mesh[names[0]] if len(names) == 1 else mesh[names]


def _fsdp_mesh(mesh: DeviceMesh, replicate: int, shard_dim: str) -> DeviceMesh:
    """1-D shard mesh, or the 2-D (replicate, shard) mesh of HSDP."""
    return _submesh(mesh, "dp_replicate", shard_dim) if replicate > 1 else _submesh(mesh, shard_dim)


def blocks(model: Transformer) -> list[Block]:
    """Every transformer block, MTP blocks included."""
    # the ModuleLists hold Blocks and MTPModules (runtime/models/deepseek_v3/model.py); iterating one yields nn.Module
    return cast("list[Block]", [*model.layers, *(m.block for m in model.mtp)])


def apply_activation_checkpointing(model: Transformer, mode: str) -> int:
    """Recompute the blocks `mode` selects (full: all, selective: every second one); returns how
    many."""
    if mode == ActivationCheckpointing.NONE:
        return 0
    chosen = [
        block
        for i, block in enumerate(blocks(model))
        if mode == ActivationCheckpointing.FULL or i % 2 == 0
    ]
    for block in chosen:
        block.recompute = True
    return len(chosen)


@dataclass
class Parallelism:
    """What apply() did: the layout, the mesh (None without FSDP) and its groups."""

    layout: Layout
    mesh: object = None

    @property
    def sharded(self) -> bool:
        return self.layout.sharded


def apply(
    model: Transformer, dist_cfg: DistributedConfig, layout: Layout, device: torch.device
) -> Parallelism:
    """Expert parallelism, activation checkpointing and FSDP2 on `model`, in place (the model
    keeps its class and its state-dict names). Call before the optimizer is built."""
    apply_activation_checkpointing(model, dist_cfg.activation_checkpointing)
    if not layout.sharded:
        return Parallelism(layout)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from runtime.distributed.expert_parallel import ExpertParallel
    from runtime.models.deepseek_v3.moe import MoE

    mesh = build_mesh(layout, device.type)
    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES.get(dist_cfg.param_dtype), reduce_dtype=DTYPES.get(dist_cfg.reduce_dtype)
    )
    dense_mesh = _fsdp_mesh(mesh, layout.dp_replicate, "dp_shard_ep")
    experts_dp = layout.dp_replicate * layout.dp_shard > 1
    expert_mesh = _fsdp_mesh(mesh, layout.dp_replicate, "dp_shard") if experts_dp else None
    reshard = dist_cfg.reshard_after_forward
    for block in blocks(model):
        ignored: set[nn.Parameter] = set()
        if isinstance(block.ffn, MoE):
            experts = block.ffn.experts
            if layout.expert_parallel > 1:
                ep_mesh = mesh["ep"]
                for name in ("w13", "w2"):
                    full = getattr(experts, name)
                    # every process holds the same whole weight (or a meta one): keep its own
                    # experts, no scatter
                    sharded = distribute_tensor(
                        full.detach(), ep_mesh, [Shard(0)], src_data_rank=None
                    )
                    setattr(experts, name, nn.Parameter(sharded))
                ep = ExpertParallel(ep_mesh.get_group(), block.ffn.n_experts)
                block.ffn.expert_parallel = ep
                experts.local_weights = ep.local_weights
                if expert_mesh is not None:
                    # FSDP shards dim 1 (the expert dim 0 is already split over "ep"), as
                    # torchtitan does when both would otherwise cut dim 0
                    fully_shard(
                        experts,
                        mesh=expert_mesh,
                        reshard_after_forward=reshard,
                        mp_policy=mp,
                        shard_placement_fn=lambda param: Shard(1),
                    )
                else:  # each process owns its experts outright: nothing to gather or reduce
                    ignored = {experts.w13, experts.w2}
        fully_shard(
            block,
            mesh=dense_mesh,
            reshard_after_forward=reshard,
            mp_policy=mp,
            ignored_params=ignored or None,
        )
    # the root: embedding, head, final norms, MTP projections; gathered for the whole step
    fully_shard(model, mesh=dense_mesh, reshard_after_forward=False, mp_policy=mp)
    return Parallelism(layout, mesh)


def grad_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager[object]:
    """Context of one micro-batch's backward: `sync` False defers the gradient reduction (DDP's
    no_sync, FSDP2's set_requires_gradient_sync) to a later micro-batch."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):
        # DistributedDataParallel's (nn.Module types an unknown attribute as Tensor | Module)
        return cast(Callable[[], contextlib.AbstractContextManager[object]], module.no_sync)()
    if hasattr(module, "set_requires_gradient_sync"):  # fully_shard made it an FSDPModule
        return _fsdp_no_sync(cast("FSDPModule", module))
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: FSDPModule) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _square_share(t: torch.Tensor, world: int) -> torch.Tensor:
    """This process's share of sum(t**2) such that the sum of the shares over all processes is the
    global sum: a DTensor's local block counts once per replica of it, a plain tensor (the same on
    every process) once per process."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(t, DTensor):
        local = t.to_local().float()
        mesh = t.device_mesh
        copies = world // mesh.size()  # processes outside the DTensor's mesh hold the same block
        for size, placement in zip(mesh.shape, t.placements):
            if isinstance(placement, Replicate):
                copies *= size
        return local.square().sum() / copies
    return t.float().square().sum() / world


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, world: int) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for parameters sharded over different meshes (or none): the
    global gradient norm from one all_reduce; gradients scaled in place when it exceeds max_norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack([_square_share(g, world) for g in grads]).sum()
    if world > 1:
        dist.all_reduce(total)
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        local = g.to_local() if hasattr(g, "to_local") else g
        local.mul_(coef.to(local.device, local.dtype))
    return norm


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds of weights + gradients + optimizer state, counted from the live
    tensors (a DTensor counts its local block)."""

    def nbytes(t: object) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = 0
    for p in model.parameters():
        total += nbytes(p) + nbytes(p.grad)
    for state in optimizer.state.values():
        total += sum(nbytes(v) for v in state.values())
    return total


def setup(model: Transformer, cfg: Config, info: DistInfo, device: torch.device) -> Parallelism:
    """The trainer's entry point: resolve the layout of this launch (DistInfo), warn when the
    FSDP param_dtype is slow on this CPU, then apply() it."""
    dist_cfg = cfg.system.distributed
    layout = resolve_layout(dist_cfg, info.world_size)
    # resolved up front, so that a bad value fails the same on one process as on many
    fsdp_settings = (
        DTYPES.get(dist_cfg.param_dtype),
        DTYPES.get(dist_cfg.reduce_dtype),
        dist_cfg.reshard_after_forward,
    )
    if layout.sharded:
        param_dtype = fsdp_settings[0]
        slow = slow_cpu_dtype(device, param_dtype, PATH.system.distributed.param_dtype)
        if slow and info.is_main:
            warnings.warn(slow, stacklevel=1)
    del fsdp_settings  # apply() reads them again where it uses them
    return apply(model, dist_cfg, layout, device)
