"""One way to build a model for a layout, for training and for sampling.

Not sharded (one process, or DDP): built whole on the CPU, filled from the source if there is one,
moved to the device, then parallelized (activation checkpointing). Sharded (FSDP2 / expert
parallel): built on the meta device and sharded before any weight exists; each process then fills
in only its shards (`init_weights`), and a source's weights are read only where this process holds
them, so no process ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from generated import PATH
from generated.config import DistributedConfig, ModelConfig, MoETrainingConfig
from runtime.distributed.layout import Parallelism, resolve_layout
from runtime.distributed.precision import DTYPES, slow_cpu_dtype
from runtime.models.spec import ModelSpec


def build_model(
    spec: ModelSpec,
    model_cfg: ModelConfig,
    moe_cfg: MoETrainingConfig | None,
    dist_cfg: DistributedConfig,
    world: int,
    device: torch.device,
    load_weights: Callable[[nn.Module], None] | None = None,
    *,
    is_main: bool = True,
    pp_rank: int = 0,
) -> tuple[nn.Module, Parallelism]:
    """The model of `spec` on the layout of `world` processes (dist_cfg), on `device`, with the
    weights `load_weights` copies in (else a fresh initialisation), and what parallelize() did.
    Every process of a sharded layout must call it together."""
    layout = resolve_layout(dist_cfg, world)
    # the FSDP settings, resolved on any layout, so that a bad value fails the same on one
    # process as on many (parallelize reads them again where it uses them)
    param_dtype, _ = DTYPES.get(dist_cfg.param_dtype), DTYPES.get(dist_cfg.reduce_dtype)
    _ = dist_cfg.reshard_after_forward
    if layout.sharded and is_main:
        slow = slow_cpu_dtype(device, param_dtype, PATH.system.distributed.param_dtype)
        if slow:
            warnings.warn(slow, stacklevel=2)
    on_meta = layout.sharded or layout.pipelined
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = spec.build(model_cfg, moe_cfg)
    held: dict[int, range] = {}
    if layout.pipelined:  # only this process's stages get weights
        if spec.keep_stages is None:
            raise NotImplementedError(f"the {spec.name} family has no pipeline stages")
        held = spec.keep_stages(model, dist_cfg, layout, pp_rank)
    if not on_meta:
        if load_weights is not None:
            load_weights(model)
        model.to(device)
    parallelism = spec.parallelize(model, dist_cfg, layout, device)
    if on_meta:
        model.to_empty(device=device)
        init_weights = cast(Callable[[], None], model.init_weights)  # every family's model has one
        init_weights()  # modules a source has no weights for keep these
        if load_weights is not None:
            load_weights(model)
    parallelism.stages = held
    return model, parallelism
