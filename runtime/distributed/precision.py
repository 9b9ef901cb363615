"""Precision: the autocast dtype, gradient scaling (float16), and whether this CPU multiplies a
dtype natively."""

import contextlib

import torch
import torch.distributed as dist

from generated.config import DeviceConfig
from generated.names import Dtype
from runtime.utils.registry import DTYPES

DTYPES.register(Dtype.FLOAT32, torch.float32)
DTYPES.register(Dtype.BFLOAT16, torch.bfloat16)
DTYPES.register(Dtype.FLOAT16, torch.float16)
DTYPES.complete()


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
