"""DeepSeek-V3: MLA attention, DeepSeekMoE routing, multi-token prediction.

  model.py               the Transformer (RMSNorm, MLA, dense and MoE blocks, MTP modules)
  moe.py                 router, routed and shared experts, balancing counts
  kernels.py             the autograd functions and custom ops the two use
  parallelize.py         expert parallelism, activation checkpointing, FSDP2
  state_dict_adapter.py  Hugging Face names and config.json mapping
  generation.py          sampling with the MLA latent cache
  cost.py                parameters, FLOPs and memory per process (plan)

Registered as the ModelSpec "deepseek_v3"; the torch modules are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from generated.config import Config, DistributedConfig, ModelConfig, MoETrainingConfig
from runtime.models.spec import ModelSpec, StateDictAdapter, register_model_spec

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from runtime.distributed.layout import Layout, Parallelism


def _build(model: ModelConfig, moe: MoETrainingConfig | None = None) -> nn.Module:
    from runtime.models.deepseek_v3.model import Transformer
    from runtime.models.deepseek_v3.moe import RoutingKnobs

    return Transformer(model, RoutingKnobs.from_config(moe) if moe is not None else None)


def _parallelize(
    model: nn.Module, dist_cfg: DistributedConfig, layout: Layout, device: torch.device
) -> Parallelism:
    from runtime.models.deepseek_v3.model import Transformer
    from runtime.models.deepseek_v3.parallelize import parallelize

    assert isinstance(model, Transformer), type(model)  # built by _build
    return parallelize(model, dist_cfg, layout, device)


def _adapter() -> StateDictAdapter:
    from runtime.models.deepseek_v3 import state_dict_adapter

    return state_dict_adapter


def _generate(*args: Any, **kwargs: Any) -> Tensor:
    from runtime.models.deepseek_v3.generation import generate

    return generate(*args, **kwargs)


def _plan(cfg: Config, world: int, gpu_memory_gib: float) -> dict[str, Any]:
    from runtime.models.deepseek_v3.cost import plan

    return plan(cfg, world, gpu_memory_gib)


SPEC = register_model_spec(
    ModelSpec(
        name="deepseek_v3",
        hf_model_type="deepseek_v3",
        build=_build,
        parallelize=_parallelize,
        state_dict_adapter=_adapter,
        generate=_generate,
        plan=_plan,
    )
)
