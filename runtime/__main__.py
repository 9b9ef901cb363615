"""`python -m runtime COMMAND ...`: the same as the `deepseek-moe` command (runtime/cli/main.py)."""

import sys

from runtime.cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
