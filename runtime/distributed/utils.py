"""Device, precision, torch.compile and DDP setup from the `system` section's subsections."""

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from generated import PATH
from generated.config import DeviceConfig, DistributedConfig, TorchCompilationConfig
from generated.names import Backend, Device, Dtype
from runtime.utils.registry import BACKENDS, DTYPES


class SystemConfigError(RuntimeError):
    """The `system` settings cannot run here (bad device, multi-process launch without DDP...)."""


DTYPES.register(Dtype.FLOAT32, torch.float32)
DTYPES.register(Dtype.BFLOAT16, torch.bfloat16)
DTYPES.register(Dtype.FLOAT16, torch.float16)
DTYPES.complete()

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


def autocast_dtype(device_cfg: DeviceConfig) -> torch.dtype:
    return DTYPES.get(device_cfg.dtype)


def autocast_context(
    device: torch.device, dtype: torch.dtype
) -> contextlib.AbstractContextManager[object]:
    """Autocast of forward and loss; a no-op for float32 (weights stay float32 in every case)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_native_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices with native instructions. bfloat16 and float16
    CPU matmuls go through oneDNN, which needs AVX512 (bf16: AVX512-BF16 or AMX best) for them; on
    an AVX2-only CPU it falls back to a reference kernel: 0.27 GFLOP/s for a 2048^3 bf16 matmul
    against 143 for float32, measured on a 2-core AVX2 EPYC."""
    if dtype == torch.float32:
        return True
    check = {
        torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
        torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
    }[dtype]
    return bool(check())


def slow_cpu_dtype(device: torch.device, dtype: torch.dtype, path: str) -> str | None:
    """A warning when the setting at `path` puts `dtype` matmuls on a CPU without native support
    for them, else None."""
    if device.type != "cpu" or cpu_native_matmul(dtype):
        return None
    name = str(dtype).removeprefix("torch.")
    return (
        f"{path} is {name} but this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native "
        f"{name} matmul: oneDNN falls back to a reference kernel, hundreds of times slower than "
        f"float32 here; use float32 on this machine"
    )


class ShardedGradScaler(torch.amp.GradScaler):
    """torch's GradScaler for a model sharded by FSDP2 / expert parallelism: each process checks
    only the gradient blocks it holds for inf/NaN, so the verdict is all-reduced (max) over every
    process before the step, and all skip together (a process that stepped while another skipped
    would leave the shards of one model at different steps)."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.is_enabled():
            return
        super().unscale_(optimizer)
        found = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        assert self._scale is not None  # unscale_ above made it
        verdict = torch.zeros((), device=self._scale.device)  # one collective on every process
        for found_inf in found.values():
            verdict = torch.maximum(verdict, found_inf.to(verdict.device))
        dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        for found_inf in found.values():
            found_inf.copy_(verdict.reshape(found_inf.shape))


def grad_scaler(
    device: torch.device, dtype: torch.dtype, sharded: bool = False
) -> torch.amp.GradScaler:
    """Gradient scaling, enabled for float16 only; `sharded`: the verdict on inf/NaN gradients is
    every process's (ShardedGradScaler)."""
    scaler_class = ShardedGradScaler if sharded else torch.amp.GradScaler
    return scaler_class(device.type, enabled=dtype == torch.float16)


def init_distributed(launch: DistInfo, dist_cfg: DistributedConfig, device_type: str) -> DistInfo:
    """Initialise the process group of a checked multi-process `launch` (from check_launch);
    `enabled: true` in a single process runs without DDP."""
    if launch.world_size <= 1:
        return DistInfo(1, 0, 0, False)
    backend = process_group_backend(dist_cfg, device_type)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return launch


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


def compile_module(module: nn.Module, compile_cfg: TorchCompilationConfig) -> nn.Module:
    """torch.compile(module, mode=compile_mode) when TorchCompilationConfig.compile is set."""
    if not compile_cfg.compile:
        return module
    # the spec's choices are torch's modes; torch.compile of a Module is an OptimizedModule
    return cast(nn.Module, torch.compile(module, mode=str(compile_cfg.compile_mode)))


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
