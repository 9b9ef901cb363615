"""Name -> implementation registries for every config field whose value picks an implementation.

Each registry is tied to the spec field (dotted path) whose `choices` it implements;
tests/test_registry.py checks that the two hold exactly the same names. Implementations register
themselves where they are defined (`@SCHEDULES.register("cosine")`); `all_registries()` imports
those modules so every registry is complete.
"""

import importlib


class Registry:
    """A named mapping of choice -> implementation for the spec field `field`."""

    def __init__(self, field, what):
        self.field = field
        self.what = what
        self._items = {}

    def register(self, name, obj=None):
        """Register `obj` under `name`; without `obj`, return a decorator."""
        if obj is not None:
            self._add(name, obj)
            return obj

        def decorator(fn):
            self._add(name, fn)
            return fn

        return decorator

    def _add(self, name, obj):
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} registered twice")
        self._items[name] = obj

    def get(self, name):
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r} ({self.field}); one of: {', '.join(self.names())}") from None

    __getitem__ = get

    def __contains__(self, name):
        return name in self._items

    def names(self):
        return list(self._items)

    def __repr__(self):
        return f"Registry({self.field}: {', '.join(self.names())})"


# data.dataset -> corpus builder (runtime/data.py)
DATASETS = Registry("data.dataset", "dataset")
# data.tokenizer -> (byte corpus, data, vocab_size) -> corpus of its tokens (runtime/data.py)
TOKENIZERS = Registry("data.tokenizer", "tokenizer")
# schedule.schedule_type -> lr multiplier after warm-up (runtime/schedule.py)
SCHEDULES = Registry("schedule.schedule_type", "schedule type")
# system.device.dtype -> torch dtype (runtime/distributed.py)
DTYPES = Registry("system.device.dtype", "dtype")
# system.compile.compile_mode -> torch.compile mode (runtime/distributed.py)
COMPILE_MODES = Registry("system.compile.compile_mode", "compile mode")
# system.distributed.backend -> resolver(device_type) -> process-group backend (runtime/distributed.py)
BACKENDS = Registry("system.distributed.backend", "distributed backend")
# training.nonfinite_loss -> policy (runtime/train.py)
NONFINITE_POLICIES = Registry("training.nonfinite_loss", "non-finite loss policy")

_IMPLEMENTING_MODULES = ("runtime.data", "runtime.schedule", "runtime.distributed", "runtime.train")

# Spec fields with `choices` whose implementation is not chosen through a registry here:
# the model helper's code branches on them directly.
EXTERNAL_CHOICE_FIELDS = {"model.score_func": "runtime/model.py (router scoring)"}


def all_registries():
    """Every registry, keyed by the spec field it implements, with all implementations loaded."""
    for module in _IMPLEMENTING_MODULES:
        importlib.import_module(module)
    return {r.field: r for r in (DATASETS, TOKENIZERS, SCHEDULES, DTYPES, COMPILE_MODES, BACKENDS, NONFINITE_POLICIES)}
