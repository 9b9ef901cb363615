"""Test-only fault injection.

DEEPSEEK_MOE_FAULT="phase:N[,phase:N...]" makes the process SIGKILL itself the N-th time it reaches
`phase` (one of FAULT_PHASES). DEEPSEEK_MOE_READ_ERRORS="[PART:]N" makes the first N reads of
checkpoint files (whose path contains PART, when given) fail with EIO (a flaky disk or network file
system), on the ranks DEEPSEEK_MOE_FAULT_RANKS lists (all when unset). Without the variables every fault point is a dict lookup."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys

FAULT_ENV = "DEEPSEEK_MOE_FAULT"
READ_ERRORS_ENV = "DEEPSEEK_MOE_READ_ERRORS"
FAULT_RANKS_ENV = "DEEPSEEK_MOE_FAULT_RANKS"
FAULT_PHASES = {
    "step": "mid optimizer step: gradients computed, weights not yet updated (the trainer)",
    "eval": "after each validation batch of an evaluation (the evaluator)",
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


_read_errors: tuple[str, int] | None = None


def this_rank_faulty() -> bool:
    """Whether fault injection applies to this process (DEEPSEEK_MOE_FAULT_RANKS, all if unset)."""
    ranks = os.environ.get(FAULT_RANKS_ENV)
    return ranks is None or os.environ.get("RANK", "0") in ranks.split(",")


def read_fault(path: str) -> None:
    """Raise EIO for the first N reads of checkpoint files DEEPSEEK_MOE_READ_ERRORS targets."""
    global _read_errors
    if _read_errors is None:
        part, _, count = os.environ.get(READ_ERRORS_ENV, "").rpartition(":")
        if count and not count.isdigit():
            raise ValueError(f"{READ_ERRORS_ENV}: {count!r} is not [PART:]N")
        _read_errors = (part, int(count or 0) if this_rank_faulty() else 0)
    part, left = _read_errors
    if left > 0 and part in str(path):
        _read_errors = (part, left - 1)
        raise OSError(errno.EIO, os.strerror(errno.EIO), path)
