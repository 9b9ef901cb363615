"""`deepseek-moe completion bash|zsh|fish`: print the shell completion script.

The scripts are generated from the spec with the rest of the config layer (generated/completion.*,
by codegen/generate.py): the commands and subcommands (runtime/cli/main.py's tables), every
`--section.field` flag with its old names where config flags go, and the choices, special values
or true/false of a field after its flag. Install:

    bash   source <(deepseek-moe completion bash)              # in ~/.bashrc
           deepseek-moe completion bash > ~/.local/share/bash-completion/completions/deepseek-moe
    zsh    source <(deepseek-moe completion zsh)               # in ~/.zshrc, after compinit
           deepseek-moe completion zsh > "${fpath[1]}/_deepseek-moe"
    fish   deepseek-moe completion fish > ~/.config/fish/completions/deepseek-moe.fish
"""

from __future__ import annotations

import sys
from importlib import resources

from runtime.cli import console

PROG = "completion"
SHELLS = ("bash", "zsh", "fish")
USAGE = (
    f"usage: deepseek-moe completion {{{','.join(SHELLS)}}}\n\n"
    + __doc__.split("Install:\n\n", 1)[1]
)


def script(shell: str) -> str:
    """The completion script of a shell (generated/completion.SHELL)."""
    return resources.files("generated").joinpath(f"completion.{shell}").read_text(encoding="utf-8")


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return console.EXIT_OK
    if len(argv) != 1 or argv[0] not in SHELLS:
        given = f"; got {' '.join(argv)!r}" if argv else ""
        console.error(PROG, f"name one shell: {', '.join(SHELLS)}{given}")
        print(USAGE, end="", file=sys.stderr)
        return console.EXIT_USAGE
    return console.run_command(PROG, lambda: _print(argv[0]))


def _print(shell: str) -> int:
    sys.stdout.write(script(shell))
    return console.EXIT_OK
