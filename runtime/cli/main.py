"""`deepseek-moe COMMAND ...` (or `python -m runtime COMMAND ...`): the project's command line.

Each command is a module of this package with a `main(argv) -> exit code` that reports errors
through console.py. They are imported lazily so that `config` never imports torch (the core
package installs without it; train, sample and export need the `train` extra).
"""

import importlib
import sys
from collections.abc import Callable

from runtime.cli import console

USAGE = f"""usage: deepseek-moe COMMAND [ARGS]   (or: python -m runtime COMMAND [ARGS])

commands:
  config   validate | show | migrate | explain | diff config files (no torch needed)
  train    train from a config: train [CONFIG] [--section.field VALUE ...]
  export   write a checkpoint as a Hugging Face folder: export CHECKPOINT OUT_DIR
  sample   generate text: sample SOURCE --prompt TEXT --max-new-tokens N --temperature T [--json]
           (under torchrun: sharded, [--expert-parallel E])
  plan     parameters, FLOPs and memory per process: plan CONFIG [--world N] [--gpu-memory GiB]
  data     prepare INPUT... --tokenizer SRC --out DIR (a corpus into a dataset folder) | inspect DIR
           | replay CONFIG --step N [--world W] [--rank R] (the token ids and text a step reads)
  schedule lr, batch, bias speed, MTP weight and phase over the run: schedule CONFIG [--at POINTS] [--json] [--plot FILE]
  launch   torchrun commands per node, or a Slurm script: launch CONFIG --nodes N --gpus-per-node G [--slurm]
  completion  bash | zsh | fish: print a shell completion script (commands, flags, choices)

`COMMAND --help` describes a command; `train --help` lists every config flag.
{console.__doc__.split("Exit codes", 1)[1].replace(", the same for every command:", "Exit codes:", 1)}"""

COMMANDS = {  # name -> module of this package with its `main`
    "config": "runtime.cli.config",
    "train": "runtime.cli.train",
    "export": "runtime.cli.export",
    "sample": "runtime.cli.sample",
    "plan": "runtime.cli.plan",
    "data": "runtime.cli.data",
    "launch": "runtime.cli.launch",
    "schedule": "runtime.cli.schedule",
    "completion": "runtime.cli.completion",
}

SUBCOMMANDS = {
    "config": ("validate", "show", "migrate", "explain", "diff"),
    "data": ("prepare", "inspect", "replay"),
}
"""Each command's subcommands. Shell completion offers these and COMMANDS: codegen/generate.py
reads both tables into generated/completion.*, so `make check` fails until `make generate` has
seen a new command."""

CONFIG_FLAG_PLACES = (
    "train",
    "plan",
    "launch",
    "schedule",
    "config validate",
    "config show",
    "config explain",
    "config diff",
    "data replay",
)
"""Where `--section.field VALUE` flags go (`COMMAND` or `COMMAND SUBCOMMAND`); completion offers
every flag there, old names too, and the choices of a choice field after its flag."""

# imported by train / sample / export, not by the core (config-only) package
TRAIN_EXTRA_MODULES = {"torch", "numpy", "tqdm", "matplotlib", "safetensors", "tokenizers"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return console.EXIT_OK if argv else console.EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        console.error("deepseek-moe", f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
        print(USAGE, end="", file=sys.stderr)
        return console.EXIT_USAGE
    try:
        module = importlib.import_module(COMMANDS[command])
    except ModuleNotFoundError as error:
        if error.name not in TRAIN_EXTRA_MODULES:
            raise
        console.error(
            command,
            f"needs the train extra (no module {error.name!r}): pip install -e '.[train]' or make setup",
        )
        return console.EXIT_FAILURE
    run: Callable[[list[str]], int] = module.main  # reports its own errors (console.run_command)
    return run(rest)
