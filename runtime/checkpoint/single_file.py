"""Single-file checkpoints (one process, or DDP's rank 0): a checksummed torch.save archive.

Integrity: the file is torch.save's zip archive whose zip comment (the last bytes of the file, which
zip readers and torch.load ignore) is a trailer `deepseek-moe sha256 <hex>`: the sha256 of every
byte before the comment-length field. `load_checkpoint` checks it before unpickling anything, then
unpickles with `weights_only=True` only. Writes go to a temporary file (fsync, then os.replace;
runtime/utils/files.py), so a file under a checkpoint name is always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import struct
from collections.abc import Mapping
from typing import IO, Any, cast

import torch

from runtime.checkpoint.format import (
    BEST_NAME,
    FORMAT_VERSION,
    CheckpointError,
    check_finite,
    checkpoint_name,
    config_digest,
    upgrade,
)
from runtime.utils.faults import fault_armed, fault_point, read_fault
from runtime.utils.files import atomic_file, describe_os_error

TEMP_FILE = re.compile(r"^\.(ckpt_\d+\.pt|best\.pt)\..*\.tmp$")  # atomic_save's temporary files
TRAILER_MAGIC = b"deepseek-moe sha256 "
TRAILER_LEN = len(TRAILER_MAGIC) + 64
EOCD_SIG = b"PK\x05\x06"  # zip end-of-central-directory record (22 bytes + comment)
EOCD_LEN = 22
CHUNK = 1 << 20


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


def atomic_save(obj: object, path: str) -> None:
    """torch.save + sha256 trailer to a temporary file in the same folder, fsync, then os.replace.
    On any failure the temporary file is removed and `path` is left as it was."""
    with atomic_file(path, "w+b", fault_name="checkpoint_rename") as out:
        fault_at = _tensor_bytes(obj) // 2 if fault_armed("checkpoint_write") else None
        writer = _HashingWriter(out, fault_at)
        torch.save(obj, cast(IO[bytes], writer))  # duck-typed: write and flush are all it uses
        writer.finish()


def verify_checksum(path: str) -> None:
    """Check the sha256 trailer of a checkpoint file; raises CheckpointError naming the problem.
    A read that fails is tried once more (a transient error is no damage)."""
    try:
        _verify_checksum(path)
    except CheckpointError as error:
        if not error.args[0].startswith(f"cannot read checkpoint {path}"):
            raise
        _verify_checksum(path)


def _verify_checksum(path: str) -> None:
    try:
        read_fault(path)
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
    path: str, map_location: str | torch.device = "cpu", mmap: bool = False, verified: bool = False
) -> dict[str, Any]:
    """The checkpoint dict of a file, after checking its checksum (unless `verified`: another
    process of the run did) and, for format 2, the config hash. Unpickles with
    weights_only=True: tensors and plain data only, never arbitrary objects. mmap=True maps the
    tensors' storage from the file (pages are read when used) instead of reading it all."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not verified:
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
    return upgrade(state)


class FileWriter:
    """Writes the checkpoints of `folder` as single files (the main process alone)."""

    def __init__(self, folder: str) -> None:
        self.dir = folder

    def name(self, step: int) -> str:
        return checkpoint_name(step)

    @property
    def best_name(self) -> str:
        return BEST_NAME

    def write(self, state: Mapping[str, Any], path: str) -> None:
        check_finite(state, path)
        try:
            atomic_save(state, path)
        except OSError as error:
            raise CheckpointError(
                f"cannot write checkpoint {path}: {describe_os_error(error)}"
            ) from None

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
