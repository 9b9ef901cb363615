"""Stop requests by signal: the first SIGTERM / SIGINT asks the training loop to stop after its
current step (with a checkpoint); repeats of that same signal are absorbed (Slurm signals the
launcher and every worker, and torchrun forwards its copy again, so a worker gets two); a second,
different one (SIGINT after SIGTERM, or SIGTERM after SIGINT) stops at once."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Self


class StopSignals:
    """While active (main thread only), SIGTERM and SIGINT set `received` (the signal's name) so
    that the loop stops after its current step; the same signal again is absorbed; the other one
    restores the previous handlers and is re-delivered, i.e. stops at once. Nothing is printed from
    the handler (stderr is not reentrant)."""

    NAMES = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            return
        if name == self.received:  # the same request again (forwarded by the launcher)
            return
        self.__exit__()
        os.kill(os.getpid(), signum)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
