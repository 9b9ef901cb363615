"""A model family as one registered bundle (torchtitan's ModelSpec): what the trainer, `sample`,
`export` and `plan` need of a model, and nothing else of it.

  build               (model section, moe section or None) -> the model, on the current device
                      (the meta device when it is to be sharded); `model.init_weights()` fills it
  parallelize         (model, distributed section, layout, device) -> Parallelism: expert
                      parallelism, activation checkpointing and FSDP2 in place
  state_dict_adapter  () -> its Hugging Face names and config mapping (StateDictAdapter)
  generate            (model, prompt ids, settings...) -> ids: sampling with the model's cache
  plan                (config, processes, GPU GiB) -> parameters, FLOPs and memory per process
  keep_stages         (model on meta, distributed section, layout, pipeline rank) -> {stage: its
                      layers}: prunes the model to the pipeline stages that process holds
  stage_modules       (pruned model, {stage: layers}, stages, moe section, eos id or None) ->
                      {stage: module(x, tokens=window)}, the last returning its loss vector (and
                      `loss_fn`, which weighs it); None: the family has no pipeline

Building a spec must stay cheap: `plan` and `config` use this package without torch, so a family's
__init__ imports its torch modules inside these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from generated.config import Config, DistributedConfig, ModelConfig, MoETrainingConfig

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from runtime.distributed.layout import Layout, Parallelism


class StateDictAdapter(Protocol):
    """A family's Hugging Face mapping (a module satisfies it): config.json <-> model fields, our
    weight names <-> the folder's."""

    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]: ...

    def model_fields_from_hf_config(
        self, config_json: dict[str, Any], source: str = ...
    ) -> dict[str, object]: ...

    def fp8_block(self, config_json: dict[str, Any], source: str = ...) -> tuple[int, int]: ...

    def is_stacked_experts(self, name: str) -> bool: ...

    def hf_tensors(
        self, name: str, t: Tensor, cfg: ModelConfig, first_expert: int = ...
    ) -> list[tuple[str, Tensor]]: ...

    def hf_weight_plan(
        self, keys: Iterable[str], n_layers: int
    ) -> tuple[dict[str, tuple[Any, ...]], list[tuple[str, str]]]: ...

    def from_hf_state_dict(self, hf: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_model_type: str  # config.json's model_type of this family's Hugging Face folders
    build: Callable[[ModelConfig, MoETrainingConfig | None], nn.Module]
    parallelize: Callable[[nn.Module, DistributedConfig, Layout, torch.device], Parallelism]
    state_dict_adapter: Callable[[], StateDictAdapter]
    generate: Callable[..., Tensor]
    plan: Callable[[Config, int, float], dict[str, Any]]
    keep_stages: Callable[..., dict[int, range]] | None = None
    stage_modules: Callable[..., dict[int, nn.Module]] | None = None

    @property
    def adapter(self) -> StateDictAdapter:
        return self.state_dict_adapter()


MODEL_SPECS: dict[str, ModelSpec] = {}


def register_model_spec(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODEL_SPECS:
        raise ValueError(f"model family {spec.name!r} registered twice")
    MODEL_SPECS[spec.name] = spec
    return spec


def get_model_spec(name: str | None = None) -> ModelSpec:
    """The family `name`, or the first registered (DeepSeek-V3) when None."""
    if name is None:
        return next(iter(MODEL_SPECS.values()))
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise KeyError(f"no model family {name!r}; one of {', '.join(MODEL_SPECS)}") from None


def model_config(model: nn.Module) -> ModelConfig:
    """The model section a family's model was built from (every family's model keeps it as
    `.config`, as nanoGPT's GPT does)."""
    return cast(ModelConfig, model.config)


def spec_for_hf(model_type: str | None) -> ModelSpec | None:
    """The family whose Hugging Face folders have this config.json model_type, or None."""
    return next((s for s in MODEL_SPECS.values() if s.hf_model_type == model_type), None)
