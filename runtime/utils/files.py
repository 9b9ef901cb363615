"""Files written atomically: a temporary file beside the target, fsynced, then renamed (and the
folder fsynced), so a file under its final name is always complete. Modes follow the umask, like
any file the run writes (mkstemp's own 0600 would keep a shared cache private)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from runtime.utils.faults import fault_point


def describe_os_error(error: OSError) -> str:
    """`No space left on device (ENOSPC)` from an OSError."""
    name = errno.errorcode.get(error.errno) if error.errno else None
    text = error.strerror or str(error)
    return f"{text} ({name})" if name else text


def default_file_mode() -> int:
    """The mode open() would give a new file under the current umask (mkstemp's is always 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", fault_name: str | None = None) -> Iterator[IO[Any]]:
    """An open temporary file beside `path` that becomes `path` (fsync, rename, folder fsync) when
    the block ends normally; on any failure it is removed and `path` is left as it was.
    `fault_name`: the fault point reached between the fsync and the rename (tests)."""
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
    """Write `data` to `path` atomically (atomic_file)."""
    with atomic_file(path) as out:
        out.write(data)


def atomic_write_chunks(path: str, chunks: Iterable[bytes]) -> None:
    """Write the byte strings of `chunks` one after another to `path` atomically (atomic_file)."""
    with atomic_file(path) as out:
        for chunk in chunks:
            out.write(chunk)
