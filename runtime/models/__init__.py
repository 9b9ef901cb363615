"""Model families. Each registers a ModelSpec (spec.py): build, parallelize, state-dict adapter,
generation, cost. A second family is a package beside deepseek_v3/ and one import here."""

from runtime.models import deepseek_v3  # noqa: F401  (registers its ModelSpec)
from runtime.models.spec import (
    MODEL_SPECS,
    ModelSpec,
    StateDictAdapter,
    get_model_spec,
    model_config,
    register_model_spec,
    spec_for_hf,
)

__all__ = [
    "MODEL_SPECS",
    "ModelSpec",
    "StateDictAdapter",
    "get_model_spec",
    "model_config",
    "register_model_spec",
    "spec_for_hf",
]
