"""Data parallelism of the training module: DDP, gradient-sync control for
gradient accumulation (DDP's no_sync, FSDP2's set_requires_gradient_sync), gradient clipping over
parameters on several meshes, and the state bytes a process holds."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from generated.config import DistributedConfig

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


def ddp_options(dist_cfg: DistributedConfig) -> dict[str, Any]:
    """Keyword arguments of DistributedDataParallel from DistributedConfig."""
    return {
        "bucket_cap_mb": dist_cfg.ddp_bucket_cap_mb,
        "find_unused_parameters": dist_cfg.find_unused_parameters,
    }


def wrap_ddp(module: nn.Module, dist_cfg: DistributedConfig, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, **ddp_options(dist_cfg))


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


def square_share(t: torch.Tensor, world: int) -> torch.Tensor:
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
    total = torch.stack([square_share(g, world) for g in grads]).sum()
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
