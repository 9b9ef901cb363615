"""Training logs through Python `logging`: the console and `<out_dir>/train.log` get the same
timestamped lines.

Console: INFO to stdout, WARNING and above to stderr, both looked up when a record is written (so
redirections made after setup, pytest's included, are honoured), through `tqdm.write` while a
progress bar is on screen so the bar is not torn. Only the main process logs.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "deepseek_moe"
LOG_NAME = "train.log"
FORMAT = "%(asctime)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

log = logging.getLogger(LOGGER_NAME)
log.propagate = False  # our handlers only: no doubled lines through the root logger


class ConsoleHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.bar = None  # the tqdm bar on screen, if any

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            if self.bar is not None:
                from tqdm import tqdm

                tqdm.write(text, file=stream)
            else:
                stream.write(text + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001 - logging must never kill the run
            self.handleError(record)


def _formatter() -> logging.Formatter:
    return logging.Formatter(FORMAT, DATE_FORMAT)


def configure(enabled: bool = True) -> ConsoleHandler | None:
    """Reset the logger to a console handler (or none when `enabled` is false: non-main processes);
    returns the console handler."""
    close()
    log.setLevel(logging.INFO)
    if not enabled:
        log.addHandler(logging.NullHandler())
        return None
    console = ConsoleHandler()
    console.setFormatter(_formatter())
    log.addHandler(console)
    return console


def add_file(path: str, level: int = logging.NOTSET) -> logging.FileHandler:
    """Also write every line (of at least `level`) to `path` (appended: a resumed run continues
    its log)."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(_formatter())
    handler.setLevel(level)
    log.addHandler(handler)
    return handler


def console_handler() -> ConsoleHandler | None:
    return next((h for h in log.handlers if isinstance(h, ConsoleHandler)), None)


def close() -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def format_duration(seconds: float) -> str:
    """`1:02:03` / `2:03` for an ETA."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
