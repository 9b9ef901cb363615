"""The checkpoint format: the union of the run's Stateful components, plus run metadata.

A checkpoint is a dict loadable with `torch.load(weights_only=True)`: the union of the run's
Stateful components' state_dict()s, one key each (the trainer's inventory: model (router-bias
buffers included), optimizer, scaler (float16 only), schedule ({step}), data ({next_step}), rng
(python, numpy, torch, cuda), balancer (pending MoE load counts), metrics (best_val_loss, val_loss,
last_val_improved, elapsed_s)), plus the run's metadata: format_version, step (optimizer steps
done), run_id, tokenizer, config (the resolved config as a plain dict) and config_sha256 (sha256 of
the config as canonical JSON, checked on load). `checkpoint_dict` builds it, `load_components`
restores it. Step checkpoints are `ckpt_{step:07d}.pt` (a single file, single_file.py) or
`ckpt_{step:07d}/` (a sharded folder, dcp.py); the best one is also kept apart as `best.pt` /
`best/`. Format 3 is this layout; formats 1-2 (validation record and elapsed time at the top
level, no schedule / balancer keys) are upgraded on load. Non-finite weights are never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 3
STEP_FILE = re.compile(r"^ckpt_(\d+)(?:\.pt)?$")  # a file, or a sharded folder (dcp.py)
BEST_NAME = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read, trusted or written. `all_ranks`: every process of a
    multi-process run raised this same error together (one of them reports it)."""

    def __init__(self, message: str, all_ranks: bool = False) -> None:
        super().__init__(message)
        self.all_ranks = all_ranks


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:07d}.pt"


# ---------------------------------------------------------------------------------------------
# RNG states as tensors and plain types (so that weights_only loading accepts them)


def capture_rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    rng = {
        "python": {
            "version": version,
            "state": torch.tensor(state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return rng


def restore_rng_state(rng: Mapping[str, Any]) -> None:
    py = rng["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = rng["numpy"]
    np.random.set_state(
        {
            "bit_generator": npy["bit_generator"],
            "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") and torch.cuda.is_available():
        states = list(rng["cuda"])
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # another GPU count: give every device the first saved state
            for index in range(torch.cuda.device_count()):
                torch.cuda.set_rng_state(states[0], index)


class RNGState:
    """The process's random generators as a Stateful component (python, numpy, torch, cuda)."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restore_rng_state(state)


# ---------------------------------------------------------------------------------------------
# The checkpoint: a union of Stateful components

OPTIONAL_COMPONENTS = frozenset({"scaler"})  # absent (or {}) in a checkpoint: keep the fresh state


def checkpoint_dict(components: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint of `components` (name -> object with state_dict()) and `meta` (run metadata:
    step, run_id, tokenizer, config)."""
    state = {"format_version": FORMAT_VERSION, **meta}
    if "config" in meta:
        state["config_sha256"] = config_digest(meta["config"])
    for name, component in components.items():
        state[name] = component.state_dict()
    return state


def load_components(components: Mapping[str, Any], state: Mapping[str, Any], path: str) -> None:
    """Load every component from its key of checkpoint `state` (CheckpointError naming the part
    that does not fit), in the order given (put `rng` last: loading it restores the generators)."""
    for name, component in components.items():
        part = state.get(name)
        if not part and name in OPTIONAL_COMPONENTS:
            continue
        try:
            if part is None:
                raise KeyError(f"no {name!r} state")
            if name == "model":
                check_weights_fit(component, part, path)
            component.load_state_dict(part)
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            if isinstance(error, CheckpointError):
                raise
            raise CheckpointError(
                f"checkpoint {path}: its {name} state does not fit this run: "
                f"{type(error).__name__}: {error}"
            ) from None


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A format 1-2 checkpoint in format 3's layout (same tensors, regrouped)."""
    if int(state.get("format_version", 1)) >= 3:
        return state
    state = dict(state)
    step = int(state["data"]["next_step"]) if "data" in state else int(state["step"])
    state.setdefault("data", {"next_step": step})
    state["schedule"] = {"step": step}
    state["balancer"] = {}
    state["metrics"] = {
        "best_val_loss": state.pop("best_val_loss", None),
        "val_loss": state.pop("val_loss", None),
        "last_val_improved": bool(state.pop("last_val_improved", False)),
        "elapsed_s": state.pop("elapsed_s", None) or 0.0,
    }
    return state


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of a config dict as canonical JSON (stored as config_sha256, checked on load)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """The model weights and optimizer states of checkpoint `state` holding NaN or inf, in this
    process's blocks (a DTensor's local shard: each process checks what it holds)."""
    named = [(f"model weight {k}", v) for k, v in (state.get("model") or {}).items()]
    for index, per_param in ((state.get("optimizer") or {}).get("state") or {}).items():
        named += [(f"optimizer {k} of parameter {index}", v) for k, v in per_param.items()]
    local = [
        (n, t.to_local() if hasattr(t, "to_local") else t)
        for n, t in named
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    local = [(n, t) for n, t in local if t.numel()]
    if not local:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in local]).tolist()
    return [n for (n, _), ok in zip(local, finite) if not ok]


def nonfinite_message(bad: list[str], path: str, step: object) -> str:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return (
        f"refusing to write checkpoint {path}: {bad[0]}{more} has non-finite values (NaN or inf) "
        f"at step {step}; earlier checkpoints are kept"
    )


def check_finite(state: Mapping[str, Any], path: str) -> None:
    """Refuse (CheckpointError) to write `path` if a model weight or optimizer state is NaN or inf."""
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(nonfinite_message(bad, path, state.get("step")))


def check_weights_fit(model: torch.nn.Module, weights: Mapping[str, Any], path: str) -> None:
    """CheckpointError naming the first tensor whose name or shape differs between the checkpoint's
    `weights` and `model`'s state_dict."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    shapes = [
        f"{k} is {list(getattr(weights[k], 'shape', ()))} in the checkpoint but {list(v.shape)} in the model"
        for k, v in expected.items()
        if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(v.shape)
    ]
    problems = (
        shapes + [f"{k} is missing" for k in missing] + [f"{k} is not in the model" for k in extra]
    )
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit the model: {problems[0]}{more}"
        )


def step_checkpoints(folder: str) -> list[tuple[int, str]]:
    """[(step, path)] of the step checkpoints in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found: list[tuple[int, str]] = []
    for name in os.listdir(folder):
        match = STEP_FILE.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)
