"""Checkpoints: atomic writes, RNG state capture, retention, `latest` / `best.pt`.

A checkpoint is a dict loadable with `torch.load(weights_only=True)`:
  format_version, step (optimizer steps done = the next step to run), model (state_dict, router-bias
  buffers included), optimizer, scaler (GradScaler state, {} when unused), rng (python, numpy,
  torch, cuda), data (the loader position, see DataModule.state), best_val_loss (float or None),
  val_loss (the last evaluation's, or None), config (the resolved config as a plain dict).
Step checkpoints are `ckpt_{step:07d}.pt`; the best one is also kept apart as `best.pt`.
"""

import os
import random
import re
import tempfile
import zipfile

import numpy as np
import torch

FORMAT_VERSION = 1
STEP_FILE = re.compile(r"^ckpt_(\d+)\.pt$")
BEST_NAME = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found or read."""


def checkpoint_name(step):
    return f"ckpt_{step:07d}.pt"


# ---------------------------------------------------------------------------------------------
# RNG states as tensors and plain types (so that weights_only loading accepts them)


def capture_rng_state():
    version, state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    rng = {
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
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


def restore_rng_state(rng):
    py = rng["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = rng["numpy"]
    np.random.set_state({
        "bit_generator": npy["bit_generator"],
        "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
        "has_gauss": npy["has_gauss"],
        "gauss": npy["gauss"],
    })
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") and torch.cuda.is_available():
        states = list(rng["cuda"])
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # another GPU count: give every device the first saved state
            for index in range(torch.cuda.device_count()):
                torch.cuda.set_rng_state(states[0], index)


# ---------------------------------------------------------------------------------------------
# Files


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save(obj, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - reported with the path
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint of this project")
    return state


def step_checkpoints(folder):
    """[(step, path)] of the step checkpoints in `folder`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = STEP_FILE.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


class Checkpointer:
    """Saving policy of the `checkpointer` section (CheckpointerConfig)."""

    def __init__(self, checkpointer, out_dir):
        self.cfg = checkpointer
        self.dir = checkpointer.save_dir if checkpointer.save_dir is not None else os.path.join(out_dir, "checkpoints")
        self.save_interval = checkpointer.save_interval
        self.always = checkpointer.always_save_checkpoint
        self.keep_best = checkpointer.save_best
        self.keep_last_n = checkpointer.keep_last_n

    @property
    def best_path(self):
        return os.path.join(self.dir, BEST_NAME)

    def should_save(self, step, *, final, improved):
        """Save after step `step` (steps done)? Every `save_interval` steps, when `improved` (the last
        validation improved on the best so far) or `always_save_checkpoint`; always at the end."""
        if final:
            return True
        if self.save_interval <= 0 or step % self.save_interval:
            return False
        return self.always or improved

    def save(self, state, step):
        path = os.path.join(self.dir, checkpoint_name(step))
        atomic_save(state, path)
        self.prune()
        return path

    def save_best(self, state):
        atomic_save(state, self.best_path)
        return self.best_path

    def prune(self):
        """Remove step checkpoints beyond the newest `keep_last_n` (0 keeps all)."""
        if self.keep_last_n <= 0:
            return []
        removed = []
        for _, path in step_checkpoints(self.dir)[: -self.keep_last_n]:
            os.unlink(path)
            removed.append(path)
        return removed

    def latest(self):
        """Path of the newest complete step checkpoint in the save folder, or None.

        Writes are atomic, so a step file is complete unless damaged afterwards; torch.save's zip
        format keeps its directory at the end, so a cheap zip check catches truncation."""
        for _, path in reversed(step_checkpoints(self.dir)):
            if zipfile.is_zipfile(path):
                return path
        return None

    def resume_path(self):
        """The checkpoint `resume_from` names: None (fresh run), `latest` (None if there is none) or
        a file, which must exist."""
        target = self.cfg.resume_from
        if target is None:
            return None
        if target == "latest":
            return self.latest()
        if not os.path.isfile(target):
            raise CheckpointError(f"checkpointer.resume_from: no checkpoint file {target!r}")
        return target
