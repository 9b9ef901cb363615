"""How every command talks to the user: one message format and one set of exit codes.

    PROG: error: MESSAGE        on stderr (a ConfigError lists its problems on the next lines)
    PROG: warning: MESSAGE      on stderr (the trainer's log adds a timestamp in front)

Exit codes, the same for every command:
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from runtime.configlib import ConfigError
from runtime.utils.files import describe_os_error

EXIT_OK = 0
"""Success."""
EXIT_FAILURE = 1
"""The input was fine but the work failed: data, checkpoint, disk, a non-finite loss."""
EXIT_USAGE = 2
"""The input is wrong: a config problem, an unknown flag, a missing or unreadable input file."""
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C (after saving, for the trainer)."""

EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_FAILURE: "failed",
    EXIT_USAGE: "bad input",
    EXIT_INTERRUPTED: "interrupted",
}

__doc__ += "".join(f"\n    {code:<3} {meaning}" for code, meaning in EXIT_CODES.items()) + "\n"


def error(prog: str, message: object, stream: TextIO | None = None) -> None:
    print(f"{prog}: error: {message}", file=stream or sys.stderr, flush=True)


def warning(prog: str, message: object, stream: TextIO | None = None) -> None:
    print(f"{prog}: warning: {message}", file=stream or sys.stderr, flush=True)


@contextlib.contextmanager
def warnings_as_messages(prog: str) -> Iterator[None]:
    """Show Python warnings (old config names, interop notes) as `PROG: warning: ...` lines, each
    once per distinct message, instead of Python's `file:line: Category: ...` format."""

    def show(
        message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        warning(prog, message)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def user_input_error(exc: BaseException) -> str | None:
    """The one-line message of an OSError about a path the user gave, or None for other errors."""
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename}: is a folder, not a file"
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: no such file or folder" if exc.filename else str(exc)
    if isinstance(exc, PermissionError):
        return f"{exc.filename}: permission denied"
    return None


def run_command(
    prog: str, body: Callable[[], int], user_errors: tuple[type[BaseException], ...] = ()
) -> int:
    """Run a command's body and turn the user's mistakes into one message and an exit code:
    ConfigError and missing/unreadable inputs exit EXIT_USAGE, `user_errors` and what else the OS
    refused (a full disk, a read-only folder) exit EXIT_FAILURE, Ctrl-C EXIT_INTERRUPTED. Anything
    else is a bug and keeps its traceback. Every command's `main` runs its work through this."""
    with warnings_as_messages(prog):
        try:
            return body()
        except ConfigError as exc:
            error(prog, exc)
            return EXIT_USAGE
        except OSError as exc:
            message = user_input_error(exc)
            if message is not None:
                error(prog, message)
                return EXIT_USAGE
            where = f" ({exc.filename})" if exc.filename else ""
            error(prog, f"{describe_os_error(exc)}{where}")
            return EXIT_FAILURE
        except user_errors as exc:
            # an error every process of a torchrun launch raised together: process 0 says it
            if not (getattr(exc, "all_ranks", False) and os.environ.get("RANK", "0") != "0"):
                error(prog, exc)
            return EXIT_FAILURE
        except KeyboardInterrupt:
            error(prog, "interrupted")
            return EXIT_INTERRUPTED
