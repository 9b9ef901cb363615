"""`python -m runtime config validate|show|migrate`: config tools that never import torch."""

import argparse
import sys
import warnings

from generated import ConfigError, dump_yaml, migrate_text, resolve


def _validate(args):
    failed = 0
    for path in args.files:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                resolve(path)
            except ConfigError as error:
                failed += 1
                print(f"{path}: {error}", file=sys.stderr)
                continue
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        print(f"{path}: ok")
    return 1 if failed else 0


def _show(args, extra):
    resolved = resolve(args.file, argv=extra)
    sys.stdout.write(dump_yaml(resolved.config))
    return 0


def _migrate(args):
    with open(args.file, "rb") as config_file:
        text = config_file.read()
    sys.stdout.write(migrate_text(text, args.file))
    return 0


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m runtime config", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check config files; exit 1 on any error")
    validate.add_argument("files", nargs="+")
    show = commands.add_parser("show", help="print the resolved config as canonical YAML")
    show.add_argument("file")
    migrate = commands.add_parser("migrate", help="print the file with every old name rewritten")
    migrate.add_argument("file")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "show":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.simplefilter("default")
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "show":
            return _show(args, extra)
        return _migrate(args)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
