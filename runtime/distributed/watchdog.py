"""No silent hang: each process publishes a heartbeat (its step and the time) in the process
group's store, and a watchdog thread ends the job when this process has finished no step for
longer than `system.distributed.timeout`, naming the processes whose heartbeats stopped too (a
frozen or dead peer) or, when none did, the collective everyone waits in.

The collectives themselves give up after the same timeout (init_process_group); `diagnose()`
turns that error into the same one-line message. Only multi-process runs start a watchdog, armed
after the first step (compiling it may take long) and fed by every step, evaluation batch and
checkpoint write.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

import torch.distributed as dist

from generated import PATH

KEY = "deepseek_moe/heartbeat/{}"
EXIT_STUCK = 1  # the work failed: a process stopped answering
log = logging.getLogger("deepseek_moe")


class CollectiveTimeout(RuntimeError):
    """A process of the run stopped making progress (the message names it)."""


# what a backend's collective says when it gives up on a peer (gloo raises a plain RuntimeError)
_GAVE_UP = ("timed out", "connection closed by peer", "connection reset by peer", "broken pipe")


def collective_gave_up(error: BaseException) -> bool:
    """Whether `error` is a collective that gave up waiting for (or lost) a peer process."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _GAVE_UP)


def cause(error: BaseException) -> str:
    """The backend's reason, without its source-file prefix: `Timed out waiting 6000ms ...`."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text[:200]


def _store() -> Any | None:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no process group, or a torch without it: no diagnosis
        return None


def beat_period(timeout: float) -> float:
    """Seconds between two heartbeats: a few per timeout, at most 5 s apart."""
    return max(0.5, min(5.0, timeout / 4))


def diagnose(timeout: float, rank: int, world: int, where: str, failed: str | None = None) -> str:
    """One line, as seen from process `rank` waiting in `where` (or whose collective `failed` with
    the backend's reason: a peer gone, the timeout passed): the processes whose heartbeat stopped
    (frozen or dead: their watchdog thread no longer writes) and those alive but without a finished
    step for longer than `timeout`, each with its last step; or that every process looks fine."""
    store, now, found = _store(), time.time(), []
    silent_after = 3 * beat_period(timeout)
    if store is not None:
        for r in range(world):
            if r == rank:
                continue
            key = KEY.format(r)
            try:  # check() first: get() of a missing key waits for it
                if not store.check([key]):
                    found.append(f"rank {r} (no heartbeat)")
                    continue
                step, progressed, beat = store.get(key).decode().split()
            except Exception:  # noqa: BLE001 - the store's host is gone too
                continue
            if now - float(beat) > silent_after:
                found.append(
                    f"rank {r} (silent for {now - float(beat):.0f} s, last at step {step})"
                )
            elif now - float(progressed) > timeout:
                found.append(
                    f"rank {r} (alive, no step for {now - float(progressed):.0f} s, at step {step})"
                )
    culprits = (
        ", ".join(found)
        if found
        else "every other process's heartbeat is recent (a peer that just died, or a collective or the device hangs)"
    )
    lead = (
        f"rank {rank} made no progress for more than {timeout:g} s ({where})"
        if failed is None
        else f"rank {rank}'s collective failed ({where}: {failed})"
    )
    return (
        f"{lead}; stuck: {culprits}; the job ends instead of hanging "
        f"({PATH.system.distributed.timeout} = {timeout:g} s)"
    )


class Watchdog:
    """The heartbeat and the watchdog thread of one process of a multi-process run."""

    def __init__(self, timeout: float, rank: int, world: int) -> None:
        self.timeout, self.rank, self.world = timeout, rank, world
        self.step, self.where = 0, "starting"
        self.last = time.monotonic()
        self.armed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def progress(self, step: int | None = None, where: str | None = None) -> None:
        """Called by the training loop: progress made (a step done, a batch evaluated)."""
        if step is not None:
            self.step = step
            self.armed = True
        if where is not None:
            self.where = where
        self.last = time.monotonic()

    def _run(self) -> None:
        period, store = beat_period(self.timeout), _store()
        while True:
            if store is not None:  # this step, when it last made progress, now (wall clock)
                progressed = time.time() - (time.monotonic() - self.last)
                try:
                    store.set(KEY.format(self.rank), f"{self.step} {progressed} {time.time()}")
                except Exception:  # noqa: BLE001 - the store's host is gone: the job is ending
                    pass
            if self._stop.wait(period):
                return
            if self.armed and time.monotonic() - self.last > self.timeout:
                message = diagnose(self.timeout, self.rank, self.world, self.where)
                log.error(f"error: {message}")
                for handler in log.handlers:
                    handler.flush()
                print(f"train: error: {message}", flush=True, file=sys.stderr)
                os._exit(EXIT_STUCK)

    def close(self) -> None:
        self._stop.set()


def start(timeout: float, rank: int, world: int) -> Watchdog | None:
    """A watchdog for this process when the run has several (None otherwise)."""
    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    return Watchdog(timeout, rank, world)
