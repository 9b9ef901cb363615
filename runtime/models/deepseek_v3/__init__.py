"""DeepSeek-V3: MLA attention, DeepSeekMoE routing, multi-token prediction.

  model.py               the Transformer (RMSNorm, MLA, dense and MoE blocks, MTP modules)
  moe.py                 router, routed and shared experts, balancing counts
  kernels.py             the autograd functions and custom ops the two use
  parallelize.py         expert parallelism, activation checkpointing, FSDP2
  state_dict_adapter.py  Hugging Face names and config.json mapping
  generation.py          sampling with the MLA latent cache
  cost.py                parameters, FLOPs and memory per process (plan)
  pipeline.py            the model cut into pipeline stages

Registered as the ModelSpec "deepseek_v3"; the torch modules are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from generated.config import Config, DistributedConfig, ModelConfig, MoETrainingConfig
from generated.names import PipelineSchedule
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


def _keep_stages(
    model: nn.Module, dist_cfg: DistributedConfig, layout: Layout, pp_rank: int
) -> dict[int, range]:
    from runtime.models.deepseek_v3.model import Transformer
    from runtime.models.deepseek_v3.pipeline import held_stages, keep_stages

    assert isinstance(model, Transformer), type(model)
    per_rank = dist_cfg.pipeline_stages_per_rank
    assert per_rank is not None  # a derived default
    v_shaped = dist_cfg.pipeline_schedule in (PipelineSchedule.ZBV, PipelineSchedule.DUALPIPEV)
    held = held_stages(
        model.config.n_layers, layout.pipeline_parallel, per_rank,
        list(dist_cfg.pipeline_split), v_shaped, pp_rank,
    )  # fmt: skip
    stages = layout.pipeline_parallel * per_rank
    keep_stages(model, list(held.values()), first=0 in held, last=stages - 1 in held)
    return held


def _stage_modules(
    model: nn.Module,
    held: dict[int, range],
    stages: int,
    moe_cfg: MoETrainingConfig,
    eos_id: int | None,
) -> dict[int, nn.Module]:
    from runtime.models.deepseek_v3.model import Transformer
    from runtime.models.deepseek_v3.pipeline import StageModule

    assert isinstance(model, Transformer), type(model)
    cfg = model.config
    n_moe = max(0, cfg.n_layers - cfg.first_k_dense) + cfg.mtp_depth
    return {
        s: StageModule(
            model,
            layers,
            first=s == 0,
            last=s == stages - 1,
            aux_weight=moe_cfg.aux_loss_weight,
            z_weight=moe_cfg.z_loss_weight,
            n_moe_layers=n_moe,
            eos_id=eos_id,
        )  # fmt: skip
        for s, layers in held.items()
    }


SPEC = register_model_spec(
    ModelSpec(
        name="deepseek_v3",
        hf_model_type="deepseek_v3",
        build=_build,
        parallelize=_parallelize,
        state_dict_adapter=_adapter,
        generate=_generate,
        plan=_plan,
        keep_stages=_keep_stages,
        stage_modules=_stage_modules,
    )
)
