"""`deepseek-moe train CONFIG [--section.field VALUE ...]` (or `python -m runtime train ...`).

Flags may come before or after the config file; `--help` lists every config flag. Under torchrun
every process runs this; see runtime/trainer/trainer.py for the run itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from generated.parser import SPEC, build_arg_parser, resolve
from runtime.checkpoint.format import CheckpointError
from runtime.cli import console
from runtime.components import logs
from runtime.components.data.errors import DataError
from runtime.components.wandb_logger import WandbUnavailable
from runtime.distributed import utils as dist_utils
from runtime.distributed.layout import SystemConfigError
from runtime.distributed.watchdog import CollectiveTimeout
from runtime.trainer.prepare import prepare_run
from runtime.trainer.trainer import NonFiniteLossError, Trainer

PROG = "train"
# the input was fine but the work failed: one message, exit 1
USER_ERRORS = (
    DataError,
    CheckpointError,
    NonFiniteLossError,
    WandbUnavailable,
    SystemConfigError,
    CollectiveTimeout,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Train from a config; returns the exit code (runtime/cli/console.py)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return console.run_command(PROG, lambda: _train(args), USER_ERRORS)


def _train(argv: list[str]) -> int:
    positionals, argv, wants_help = SPEC.split_command_line(argv)  # flags before or after CONFIG
    if wants_help:
        build_arg_parser().print_help()
        return console.EXIT_OK
    if len(positionals) > 1:
        console.error(PROG, f"one config file at most, got {' '.join(positionals)}")
        return console.EXIT_USAGE
    trainer: Trainer | None = None
    try:
        resolved = resolve(positionals[0] if positionals else None, argv=argv)
        trainer = Trainer(prepare_run(resolved))
        return trainer.run()
    finally:
        logs.close()
        trainer = None  # its sharded state goes before the process groups (dist_utils.shutdown)
        dist_utils.shutdown()
