"""Processes and devices: the torchrun launch, the process group and its collectives, the
device, a weight's local block, and the allocator settings on CPU."""

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from generated import PATH
from generated.config import DeviceConfig, DistributedConfig
from generated.names import Backend, Device
from runtime.distributed.layout import SystemConfigError
from runtime.utils.registry import BACKENDS

BACKENDS.register(
    Backend.AUTO, lambda device_type: Backend.NCCL if device_type == "cuda" else Backend.GLOO
)
BACKENDS.register(Backend.NCCL, lambda device_type: Backend.NCCL)
BACKENDS.register(Backend.GLOO, lambda device_type: Backend.GLOO)
BACKENDS.complete()


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    enabled: bool = False  # a process group was initialised and the model is wrapped in DDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_world() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from the torchrun environment (1, 0, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(
    device_cfg: DeviceConfig, local_rank: int = 0, distributed: bool = False
) -> torch.device:
    """torch.device from DeviceConfig.device: cpu, cuda, cuda:N or auto (cuda when available).
    Under DDP on CUDA each process takes cuda:LOCAL_RANK."""
    name = device_cfg.device
    if name == Device.AUTO:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemConfigError(f"{PATH.system.device.device}: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemConfigError(
                f"{PATH.system.device.device} is {name!r} but CUDA is not available"
            )
        if distributed and device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(launch: DistInfo, dist_cfg: DistributedConfig, device_type: str) -> DistInfo:
    """Initialise the process group of a checked multi-process `launch` (from check_launch), its
    collectives giving up after `timeout` seconds; `enabled: true` in a single process runs
    without DDP."""
    if launch.world_size <= 1:
        return DistInfo(1, 0, 0, False)
    backend = process_group_backend(dist_cfg, device_type)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=collective_timeout(dist_cfg))
    return launch


def collective_timeout(dist_cfg: DistributedConfig) -> datetime.timedelta:
    """How long a collective waits for the other processes (`system.distributed.timeout`)."""
    return datetime.timedelta(seconds=dist_cfg.timeout)


def check_launch(dist_cfg: DistributedConfig) -> DistInfo:
    """The launch (DistInfo from the torchrun environment, no process group yet); a multi-process
    launch (WORLD_SIZE > 1) needs `system.distributed.enabled`."""
    world, rank, local_rank = launch_world()
    if world > 1 and not dist_cfg.enabled:
        raise SystemConfigError(
            f"launched with WORLD_SIZE={world} but {PATH.system.distributed.enabled} is false; "
            f"set --{PATH.system.distributed.enabled} true (or launch a single process)"
        )
    return DistInfo(world, rank, local_rank, world > 1)


def process_group_backend(dist_cfg: DistributedConfig, device_type: str) -> str:
    return BACKENDS.get(dist_cfg.backend)(device_type)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown() -> None:
    """Destroy the process groups; callers drop their model first. FSDP2 and expert-parallel state
    holds tensors and collective handles in reference cycles: collected here, while the interpreter
    is whole, not by its teardown, where gloo's threads can release them after Python is gone
    (SIGABRT, "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def tune_malloc() -> dict[str, int] | None:
    """Keep freed memory in the process (glibc): no mmap for big blocks, no trimming of the heap.

    On this kind of VM every fresh page costs a fault plus zeroing by the kernel: allocating and
    filling a 64 MB tensor took 30 ms against 2.3 ms once the memory is reused, and a training step
    allocates many such blocks (activations, expert weight gradients). Applies to the whole process,
    so to every model a benchmark compares. Returns the settings made, or None off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        ok = ok and libc.mallopt(M_TOP_PAD, 64 << 20)
    except (OSError, AttributeError):
        return None
    return {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 64 << 20} if ok else None


def local_block(weight: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(the block this process holds, its shape, its offset in the whole weight); a plain tensor
    is its own block, a DTensor (FSDP2 / expert-parallel shard) its local tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            weight.shape, weight.device_mesh, weight.placements
        )
        return weight.to_local(), tuple(shape), tuple(offset)
    return weight, tuple(weight.shape), (0,) * weight.dim()
