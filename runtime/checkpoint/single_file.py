"""Checkpoints: atomic writes, RNG state capture, retention, `latest` / `best.pt`.

A checkpoint is a dict loadable with `torch.load(weights_only=True)`: the union of the run's
Stateful components' state_dict()s, one key each (the trainer's inventory: model (router-bias
buffers included), optimizer, scaler (float16 only), schedule ({step}), data ({next_step}), rng
(python, numpy, torch, cuda), balancer (pending MoE load counts), metrics (best_val_loss, val_loss,
last_val_improved, elapsed_s)), plus the run's metadata: format_version, step (optimizer steps
done), run_id, tokenizer, config (the resolved config as a plain dict) and config_sha256 (sha256 of
the config as canonical JSON, checked on load). `checkpoint_dict` builds it, `load_components`
restores it. Step checkpoints are `ckpt_{step:07d}.pt`; the best one is also kept apart as `best.pt`.
Format 3 is this layout; formats 1-2 (validation record and elapsed time at the top level, no
schedule / balancer keys) are upgraded on load.

Integrity: the file is torch.save's zip archive whose zip comment (the last bytes of the file, which
zip readers and torch.load ignore) is a trailer `deepseek-moe sha256 <hex>`: the sha256 of every
byte before the comment-length field. `load_checkpoint` checks it before unpickling anything, then
unpickles with `weights_only=True` only. Writes go to a temporary file (fsync, then os.replace), so
a file under a checkpoint name is always complete; weights that are not finite are never written.

Fault injection (tests only): DEEPSEEK_MOE_FAULT="phase:N[,phase:N...]" makes the process SIGKILL
itself the N-th time it reaches `phase` (see FAULT_PHASES and `fault_point`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, cast

import numpy as np
import torch

from generated import PATH
from generated.config import CheckpointerConfig
from generated.names import ResumeFrom

FORMAT_VERSION = 3
STEP_FILE = re.compile(r"^ckpt_(\d+)(?:\.pt)?$")  # a file, or a sharded folder (dcp_checkpoint.py)
TEMP_FILE = re.compile(r"^\.(ckpt_\d+\.pt|best\.pt)\..*\.tmp$")  # atomic_save's temporary files
BEST_NAME = "best.pt"
TRAILER_MAGIC = b"deepseek-moe sha256 "
TRAILER_LEN = len(TRAILER_MAGIC) + 64
EOCD_SIG = b"PK\x05\x06"  # zip end-of-central-directory record (22 bytes + comment)
EOCD_LEN = 22
CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be found, read, trusted or written."""


# ---------------------------------------------------------------------------------------------
# Test-only fault injection

FAULT_ENV = "DEEPSEEK_MOE_FAULT"
FAULT_PHASES = {
    "step": "mid optimizer step: gradients computed, weights not yet updated (train.py)",
    "eval": "after each validation batch of an evaluation (train.py)",
    "checkpoint_write": "half of a checkpoint's bytes written to its temporary file",
    "checkpoint_rename": "a checkpoint's temporary file complete and fsynced, not yet renamed",
}
_fault_plan: dict[str, int] | None = None


def _faults() -> dict[str, int]:
    global _fault_plan
    if _fault_plan is None:
        _fault_plan = {}
        for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
            phase, _, count = item.strip().partition(":")
            if phase not in FAULT_PHASES or not count.isdigit() or int(count) < 1:
                raise ValueError(
                    f"{FAULT_ENV}: {item!r} is not PHASE:N (N >= 1, PHASE one of {sorted(FAULT_PHASES)})"
                )
            _fault_plan[phase] = int(count)
    return _fault_plan


def fault_armed(phase: str) -> bool:
    return phase in _faults()


def fault_point(phase: str) -> None:
    """SIGKILL this process the N-th time `phase` is reached when DEEPSEEK_MOE_FAULT has phase:N;
    a no-op (one dict lookup) otherwise."""
    plan = _faults()
    if phase in plan:
        plan[phase] -= 1
        if plan[phase] == 0:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)


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


def _upgrade(state: dict[str, Any]) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------
# Files


def describe_os_error(error: OSError) -> str:
    """`No space left on device (ENOSPC)` from an OSError."""
    name = errno.errorcode.get(error.errno) if error.errno else None
    text = error.strerror or str(error)
    return f"{text} ({name})" if name else text


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of a config dict as canonical JSON (stored as config_sha256, checked on load)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_bytes(obj: object) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class _HashingWriter:
    """The file object torch.save writes to: passes bytes through to `out` and hashes all but the
    last two (the zip comment length, rewritten when the trailer is appended). With the
    `checkpoint_write` fault armed, it reaches that fault point once, halfway through the bytes."""

    def __init__(self, out: IO[bytes], fault_at: int | None = None) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.tail = b""
        self.size = 0
        self.fault_at = fault_at

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        if self.fault_at is not None and self.size + len(view) >= self.fault_at:
            cut = self.fault_at - self.size
            self.fault_at = None
            self._put(view[:cut])
            self.out.flush()
            fault_point("checkpoint_write")
            view = view[cut:]
        self._put(view)
        return total

    def _put(self, view: memoryview) -> None:
        if not len(view):
            return
        if len(view) >= 2:
            self.sha.update(self.tail)
            self.sha.update(view[:-2])
            self.tail = view[-2:].tobytes()
        else:
            joined = self.tail + view.tobytes()
            self.sha.update(joined[:-2])
            self.tail = joined[-2:]
        self.out.write(view)
        self.size += len(view)

    def flush(self) -> None:
        self.out.flush()

    def finish(self) -> None:
        """Append the trailer as the zip comment of the archive torch.save wrote."""
        self.out.flush()
        self.out.seek(-EOCD_LEN, os.SEEK_END)
        eocd = self.out.read(EOCD_LEN)
        if eocd[:4] != EOCD_SIG or eocd[-2:] != b"\x00\x00" or self.tail != b"\x00\x00":
            raise CheckpointError(
                "torch.save did not write a zip archive without a comment; cannot add the checksum"
            )
        self.out.seek(-2, os.SEEK_END)
        self.out.write(
            struct.pack("<H", TRAILER_LEN) + TRAILER_MAGIC + self.sha.hexdigest().encode()
        )


def default_file_mode() -> int:
    """The mode open() would give a new file under the current umask (mkstemp's is always 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _atomic_file(path: str, mode: str = "wb", fault_name: str | None = None) -> Iterator[IO[Any]]:
    """An open temporary file beside `path` that becomes `path` (fsync, rename, folder fsync) when
    the block ends normally; on any failure it is removed and `path` is left as it was. Its mode
    follows the umask, like any file the run writes."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, mode) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if fault_name is not None:
            fault_point(fault_name)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
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


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename; mode follows the umask."""
    with _atomic_file(path) as out:
        out.write(data)


def atomic_save(obj: object, path: str) -> None:
    """torch.save + sha256 trailer to a temporary file in the same folder, fsync, then os.replace.
    On any failure the temporary file is removed and `path` is left as it was."""
    with _atomic_file(path, "w+b", fault_name="checkpoint_rename") as out:
        fault_at = _tensor_bytes(obj) // 2 if fault_armed("checkpoint_write") else None
        writer = _HashingWriter(out, fault_at)
        torch.save(obj, cast(IO[bytes], writer))  # duck-typed: write and flush are all it uses
        writer.finish()


def verify_checksum(path: str) -> None:
    """Check the sha256 trailer of a checkpoint file; raises CheckpointError naming the problem."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < EOCD_LEN + TRAILER_LEN:
                raise CheckpointError(f"checkpoint {path}: truncated or damaged: only {size} bytes")
            f.seek(size - EOCD_LEN - TRAILER_LEN)
            eocd, comment = f.read(EOCD_LEN), f.read()
            if (
                eocd[:4] != EOCD_SIG
                or struct.unpack("<H", eocd[-2:])[0] != TRAILER_LEN
                or not comment.startswith(TRAILER_MAGIC)
            ):
                raise CheckpointError(
                    f"checkpoint {path}: no checksum trailer at its end: the file is truncated or damaged, "
                    f"or was not written by this trainer"
                )
            recorded = comment[len(TRAILER_MAGIC) :].decode("ascii", errors="replace")
            sha = hashlib.sha256()
            f.seek(0)
            left = size - TRAILER_LEN - 2
            while left > 0:
                block = f.read(min(CHUNK, left))
                if not block:
                    break
                sha.update(block)
                left -= len(block)
    except OSError as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {describe_os_error(error)}"
        ) from None
    if sha.hexdigest() != recorded:
        raise CheckpointError(
            f"checkpoint {path}: checksum mismatch: the file is damaged (its contents hash to "
            f"{sha.hexdigest()[:16]}..., the trailer records {recorded[:16]}...)"
        )


def load_checkpoint(
    path: str, map_location: str | torch.device = "cpu", weights: bool = True, mmap: bool = False
) -> dict[str, Any]:
    """A checkpoint dict, after checking the file's checksum and, for format 2, the config hash.
    Unpickles with weights_only=True: tensors and plain data only, never arbitrary objects.
    mmap=True maps the tensors' storage from the file (pages are read when used) instead of
    reading it all.
    A sharded checkpoint folder (runtime/checkpoint/dcp.py) gives its full weights, or with
    weights=False only its metadata (the resuming trainer loads the shards itself)."""
    if os.path.isdir(path):
        from runtime.checkpoint.dcp import load_full, load_meta

        rank = int(os.environ.get("RANK", "0"))
        return load_full(path) if weights else load_meta(path, rank)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    verify_checksum(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - reported with the path
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
            raise CheckpointError(
                f"checkpoint {path}: refused: it holds objects other than tensors and plain data, which "
                f"are never unpickled ({first})"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint of this project")
    if "config" in state and int(state.get("format_version", 1)) >= 2:
        recorded = state.get("config_sha256")
        if recorded is None:
            raise CheckpointError(f"checkpoint {path}: no config_sha256 for its config")
        if config_digest(state["config"]) != recorded:
            raise CheckpointError(
                f"checkpoint {path}: its stored config does not match its recorded hash config_sha256 "
                f"(the config was altered or damaged)"
            )
    version = int(state.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format {version} is newer than this trainer's ({FORMAT_VERSION})"
        )
    return _upgrade(state)


def check_finite(state: Mapping[str, Any], path: str) -> None:
    """Refuse (CheckpointError) to write `path` if a model weight or optimizer state is NaN or inf."""
    named = [(f"model weight {k}", v) for k, v in (state.get("model") or {}).items()]
    for index, per_param in ((state.get("optimizer") or {}).get("state") or {}).items():
        named += [(f"optimizer {k} of parameter {index}", v) for k, v in per_param.items()]
    named = [
        (n, t)
        for n, t in named
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()
    ]
    if not named:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    bad = [n for (n, _), ok in zip(named, finite) if not ok]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"refusing to write checkpoint {path}: {bad[0]}{more} has non-finite values (NaN or inf) "
            f"at step {state.get('step')}; earlier checkpoints are kept"
        )


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


class Checkpointer:
    """Saving policy of the `checkpointer` section (CheckpointerConfig)."""

    def __init__(self, checkpointer: CheckpointerConfig) -> None:
        assert checkpointer.save_dir is not None, (
            "save_dir is a derived default, filled when the config resolves"
        )
        self.cfg = checkpointer
        self.dir = checkpointer.save_dir
        self.save_interval = checkpointer.save_interval
        self.always = checkpointer.always_save_checkpoint
        self.keep_best = checkpointer.save_best
        self.keep_last_n = checkpointer.keep_last_n

    @property
    def best_path(self) -> str:
        return os.path.join(self.dir, BEST_NAME)

    def should_save(self, step: int, *, final: bool, improved: bool) -> bool:
        """Save after step `step` (steps done)? Every `save_interval` steps, when `improved` (the last
        validation improved on the best so far) or `always_save_checkpoint`; always at the end."""
        if final:
            return True
        if self.save_interval <= 0 or step % self.save_interval:
            return False
        return self.always or improved

    def check_writable(self) -> None:
        """CheckpointError now, not after hours of training, if the save folder cannot take files."""
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.dir, prefix=".write-probe.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            raise CheckpointError(
                f"cannot write checkpoints to {self.dir}: {describe_os_error(error)}"
            ) from None

    def _write(self, state: Mapping[str, Any], path: str) -> None:
        check_finite(state, path)
        try:
            atomic_save(state, path)
        except OSError as error:
            raise CheckpointError(
                f"cannot write checkpoint {path}: {describe_os_error(error)}"
            ) from None

    def step_name(self, step: int) -> str:
        """File (or folder) name of the step checkpoint after `step` steps."""
        return checkpoint_name(step)

    def save(self, state: Mapping[str, Any], step: int) -> str:
        path = os.path.join(self.dir, self.step_name(step))
        self._write(state, path)
        self.prune()
        return path

    def save_best(self, state: Mapping[str, Any]) -> str:
        self._write(state, self.best_path)
        return self.best_path

    def remove_stale_temps(self) -> list[str]:
        """Delete temporary files left by a save that was killed; returns their paths."""
        if not os.path.isdir(self.dir):
            return []
        removed: list[str] = []
        for name in sorted(os.listdir(self.dir)):
            if TEMP_FILE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, name))
                    removed.append(os.path.join(self.dir, name))
        return removed

    def prune(self) -> list[str]:
        """Remove step checkpoints beyond the newest `keep_last_n` (0 keeps all)."""
        if self.keep_last_n <= 0:
            return []
        removed: list[str] = []
        for _, path in step_checkpoints(self.dir)[: -self.keep_last_n]:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            removed.append(path)
        return removed

    def load_resume(
        self, warn: Callable[[str], object] | None = None, run_id: str | None = None
    ) -> tuple[str | None, dict[str, Any] | None]:
        """(path, state) of the checkpoint to resume from, or (None, None) for a fresh run.

        A file named by `resume_from` must load. `latest` takes the newest step checkpoint that
        loads (checksum, weights-only unpickling, config hash, step) and, when `run_id` (the out_dir's
        run) is given, belongs to that run (checkpoints older than run ids are accepted), calling
        `warn` with the problem of each newer one it skips; if step checkpoints exist but none can
        be used, that is an error rather than a silent fresh start."""
        warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
        target = self.cfg.resume_from
        if target is None:
            return None, None
        if target != ResumeFrom.LATEST:
            if not os.path.exists(target):
                raise CheckpointError(
                    f"{PATH.checkpointer.resume_from}: no checkpoint file {target!r}"
                )
            return target, load_checkpoint(target, weights=False)
        problems: list[str] = []
        for step, path in reversed(step_checkpoints(self.dir)):
            try:
                state = load_checkpoint(path, weights=False)
                if int(state["step"]) != step:
                    raise CheckpointError(
                        f"checkpoint {path}: holds step {state['step']}, not {step}"
                    )
                owner = state.get("run_id")
                if run_id is not None and owner is not None and owner != run_id:
                    raise CheckpointError(
                        f"checkpoint {path}: belongs to run {owner}, not to run {run_id} of this out_dir"
                    )
            except CheckpointError as error:
                problems.append(str(error))
                warn(f"warning: {error}; trying an older checkpoint")
                continue
            return path, state
        if problems:
            raise CheckpointError(
                f"{PATH.checkpointer.resume_from} {ResumeFrom.LATEST}: none of the {len(problems)} step checkpoints in {self.dir} "
                f"can be used (newest: {problems[0]})"
            )
        return None, None
