"""`python -m runtime COMMAND ...`: the project's command line.

Subcommands import their module lazily so that `config` never imports torch.
"""

import sys

USAGE = """usage: python -m runtime COMMAND [ARGS]

commands:
  config   validate | show | migrate config files (no torch needed)
  train    train from a config: train CONFIG [--section.field VALUE ...]
  export   write a checkpoint as a Hugging Face folder: export CHECKPOINT OUT_DIR
  sample   generate text: sample SOURCE --prompt TEXT --max-new-tokens N --temperature T [--json]
"""

COMMANDS = {
    "config": ("runtime.config_cli", "main"),
    "train": ("runtime.train", "main"),
    "export": ("runtime.hf", "export_main"),
    "sample": ("runtime.sample", "main"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n{USAGE}", end="", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[command]
    module = __import__(module_name, fromlist=[function_name])
    return getattr(module, function_name)(rest)


if __name__ == "__main__":
    sys.exit(main())
