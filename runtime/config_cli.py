"""`python -m runtime config ...`: config tools that never import torch.

validate FILE...              check files; exit 1 on any error
show FILE [--changed] [flags] the resolved config as canonical YAML (only non-defaults with --changed)
migrate FILE                  the file with every old name rewritten to its canonical key
explain FILE [flags] KEY...   each key's value, where it came from, and what it overrode
diff A B                      the keys whose resolved values differ, with their sources
"""

import argparse
import sys
import warnings

import yaml

from generated import (
    ALIASES,
    FIELDS,
    PATH,
    ConfigError,
    dump_yaml,
    flat_values,
    migrate_text,
    nest,
    resolve,
)

MODELINE_PREFIX = "# yaml-language-server:"


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
    if not args.changed:
        sys.stdout.write(dump_yaml(resolved.config))
        return 0
    changed = {
        path: value
        for path, value in flat_values(resolved.config).items()
        if value != FIELDS[path].default and resolved.sources[path].kind != "derived"
    }
    if changed:
        sys.stdout.write(yaml.safe_dump(nest(changed), sort_keys=False, default_flow_style=False))
    return 0


def _migrate(args):
    with open(args.file, "rb") as config_file:
        text = config_file.read()
    # keep the editor's schema modeline (a comment, which the YAML round trip drops)
    modelines = [
        line
        for line in text.decode("utf-8", "replace").splitlines()
        if line.startswith(MODELINE_PREFIX)
    ]
    sys.stdout.write("".join(line + "\n" for line in modelines[:1]) + migrate_text(text, args.file))
    return 0


def _describe(source, main_file):
    text = str(source)
    if source.kind == "file" and source.file != main_file:
        return f"{text} (base file)"
    return text


def _explain(args, extra):
    flags, keys = _split_flags(extra)
    if not keys:
        raise SystemExit(f"explain needs at least one KEY, e.g. {PATH.training.batch_size}")
    resolved = resolve(args.file, argv=flags)
    values = flat_values(resolved.config)
    unknown = []
    for key in keys:
        path = ALIASES.get(key, key)
        if path not in FIELDS:
            unknown.append(key)
            continue
        note = f" ({key!r} is an old name of it)" if path != key else ""
        print(f"{path} = {values[path]!r}{note}")
        print(f"  from {_describe(resolved.sources[path], args.file)}")
        for value, source in reversed(resolved.overridden.get(path, [])):
            print(f"  overrides {value!r} from {_describe(source, args.file)}")
    if unknown:
        print(
            f"unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}", file=sys.stderr
        )
        return 1
    return 0


def _split_flags(extra):
    """Split explain's arguments into --flag VALUE pairs and the KEY words."""
    flags, keys, index = [], [], 0
    while index < len(extra):
        token = extra[index]
        if token.startswith("--"):
            flags.append(token)
            if "=" not in token and index + 1 < len(extra):
                flags.append(extra[index + 1])
                index += 1
        else:
            keys.append(token)
        index += 1
    return flags, keys


def _diff(args):
    a, b = resolve(args.a), resolve(args.b)
    values_a, values_b = flat_values(a.config), flat_values(b.config)
    differing = [path for path in FIELDS if values_a[path] != values_b[path]]
    for path in differing:
        print(
            f"{path}: {values_a[path]!r} ({_describe(a.sources[path], args.a)}) -> {values_b[path]!r} ({_describe(b.sources[path], args.b)})"
        )
    if not differing:
        print("no differences")
    return 0


def main(argv):
    parser = argparse.ArgumentParser(
        prog="python -m runtime config",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check config files; exit 1 on any error")
    validate.add_argument("files", nargs="+")
    show = commands.add_parser("show", help="print the resolved config as canonical YAML")
    show.add_argument("file")
    show.add_argument(
        "--changed", action="store_true", help="only values that differ from the spec defaults"
    )
    migrate = commands.add_parser("migrate", help="print the file with every old name rewritten")
    migrate.add_argument("file")
    explain = commands.add_parser("explain", help="where each key's value came from")
    explain.add_argument("file")
    diff = commands.add_parser("diff", help="keys whose resolved values differ between two configs")
    diff.add_argument("a")
    diff.add_argument("b")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("show", "explain"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.simplefilter("default")
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "show":
            return _show(args, extra)
        if args.command == "explain":
            return _explain(args, extra)
        if args.command == "diff":
            return _diff(args)
        return _migrate(args)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
