"""Name -> implementation registries for the config fields whose value picks an implementation.

Each registry belongs to a spec field with `choices` and is keyed by that field's generated
constants (generated/names.py). Implementations register where they are defined
(`@SCHEDULES.register(ScheduleType.COSINE)`), and the defining module calls `complete()` last: a
choice without an implementation (or an implementation the spec does not list) fails at import.
Choice fields whose code branches on the constants directly are listed in BRANCHING_FIELDS.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from generated import CONSTANTS, PATH


class RegistryIncomplete(TypeError):
    """A registry's implementations differ from its spec field's choices."""


class Registry:
    """choice -> implementation for the spec field `field`, complete once `complete()` returns."""

    def __init__(self, field: str, what: str) -> None:
        self.field = field
        self.what = what
        self.choices: type[StrEnum] = CONSTANTS[field]
        self._items: dict[str, Any] = {}

    def register(self, name: StrEnum, obj: Any = None) -> Any:
        """Register `obj` under `name`; without `obj`, return a decorator."""
        if obj is not None:
            self._add(name, obj)
            return obj

        def decorator(fn: Any) -> Any:
            self._add(name, fn)
            return fn

        return decorator

    def _add(self, name: StrEnum, obj: Any) -> None:
        if not isinstance(name, self.choices):
            raise RegistryIncomplete(
                f"{self.what} {name!r} is not one of the generated constants {self.choices.__name__} of {self.field}"
            )
        if name in self._items:
            raise RegistryIncomplete(f"{self.what} {name!r} registered twice")
        self._items[name] = obj

    def complete(self) -> Registry:
        """Check that every choice of the spec field has an implementation (call at import)."""
        missing = [choice.value for choice in self.choices if choice not in self._items]
        if missing:
            raise RegistryIncomplete(
                f"{self.field}: no {self.what} implementation for the spec choices {', '.join(missing)}"
            )
        return self

    def get(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.what} {name!r} ({self.field}); one of: {', '.join(self.names())}"
            ) from None

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return [str(name) for name in self._items]

    def __repr__(self) -> str:
        return f"Registry({self.field}: {', '.join(self.names())})"


# data.dataset -> corpus builder (runtime/components/data/corpus.py)
DATASETS = Registry(PATH.data.dataset, "dataset")
# schedule.schedule_type -> lr multiplier after warm-up (runtime/components/lr_schedule.py)
SCHEDULES = Registry(PATH.schedule.schedule_type, "schedule type")
# system.device.dtype -> torch dtype (runtime/distributed/precision.py)
DTYPES = Registry(PATH.system.device.dtype, "dtype")
# system.distributed.backend -> resolver(device_type) -> process-group backend (runtime/distributed/utils.py)
BACKENDS = Registry(PATH.system.distributed.backend, "distributed backend")

# Choice fields the code branches on directly, comparing with the generated constants.
BRANCHING_FIELDS = {
    PATH.model.score_func: "runtime/models/deepseek_v3/moe.py (router scoring)",
    PATH.model.rope_scaling: "runtime/models/deepseek_v3/model.py (rotary tables and softmax scale)",
    PATH.training.nonfinite_loss: "runtime/trainer/trainer.py (stop or skip the step)",
    PATH.system.compile.compile_mode: "runtime/distributed/compile.py (passed to torch.compile as is)",
    PATH.data.token_dtype: "runtime/components/data/corpus.py (a numpy dtype name, used as is)",
    PATH.system.distributed.param_dtype: "runtime/models/deepseek_v3/parallelize.py (looked up in DTYPES, same names)",
    PATH.system.distributed.reduce_dtype: "runtime/models/deepseek_v3/parallelize.py (looked up in DTYPES, same names)",
    PATH.system.distributed.activation_checkpointing: "runtime/models/deepseek_v3/parallelize.py (which blocks to wrap)",
    PATH.system.distributed.pipeline_schedule: "runtime/distributed/pipeline.py (torch's schedule class of each name)",
}


def all_registries() -> dict[str, Registry]:
    """Every registry, keyed by the spec field it implements (complete once the modules named in
    each registry's comment above are imported)."""
    return {r.field: r for r in (DATASETS, SCHEDULES, DTYPES, BACKENDS)}
