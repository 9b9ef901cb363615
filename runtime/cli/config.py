"""`python -m runtime config ...`: config tools that never import torch.

    validate FILE...              check files
    show FILE [--changed] [flags] the resolved config as canonical YAML (only non-defaults with --changed)
    migrate FILE                  the file with every old name rewritten to its canonical key
    explain FILE [flags] KEY...   each key's value, where it came from, and what it overrode
    diff A B                      the keys whose resolved values differ, with their sources

Config flags (`--section.field VALUE`) may come before or after the file. Values may come from the
environment (`${env:NAME}`); explain and show name the variable. A secret field's value is shown as
`<secret>`. Messages and exit codes are those of every command (runtime/cli/console.py): 0 ok, 2 a
config problem or a bad argument.
"""

import sys

import yaml

from generated import (
    ALIASES,
    FIELDS,
    PATH,
    SPEC,
    ConfigError,
    Source,
    dump_yaml,
    flat_values,
    migrate_text,
    nest,
    resolve,
)
from runtime.cli import console

PROG = "config"
MODELINE_PREFIX = "# yaml-language-server:"
COMMANDS = {  # name -> (positional arguments, tool options, what it does)
    "validate": ("FILE...", (), "check config files"),
    "show": ("FILE", ("--changed",), "print the resolved config as canonical YAML"),
    "migrate": ("FILE", (), "print the file with every old name rewritten"),
    "explain": ("FILE KEY...", (), "where each key's value came from"),
    "diff": ("A B", (), "keys whose resolved values differ between two configs"),
}
USAGE = (
    "usage: python -m runtime config COMMAND ARGS [--section.field VALUE ...]\n\ncommands:\n"
    + "".join(f"  {name:<9}{args:<13}{what}\n" for name, (args, _, what) in COMMANDS.items())
)


class UsageError(Exception):
    """Wrong arguments to a config command."""


def _validate(files: list[str], flags: list[str]) -> int:
    failed = 0
    for path in files:
        try:
            resolve(path, argv=flags)
        except ConfigError as error:
            failed += 1
            console.error(PROG, f"{path}: {error}")
            continue
        print(f"{path}: ok")
    return console.EXIT_USAGE if failed else console.EXIT_OK


def _show(path: str, flags: list[str], changed_only: bool) -> int:
    resolved = resolve(path, argv=flags)
    if not changed_only:
        sys.stdout.write(dump_yaml(resolved.config))
        return console.EXIT_OK
    changed = {
        path: SPEC.shown_value(path, value)
        for path, value in flat_values(resolved.config).items()
        if value != FIELDS[path].default and resolved.sources[path].kind != "derived"
    }
    if changed:
        sys.stdout.write(yaml.safe_dump(nest(changed), sort_keys=False, default_flow_style=False))
    return console.EXIT_OK


def _migrate(path: str) -> int:
    with open(path, "rb") as config_file:
        text = config_file.read()
    # keep the editor's schema modeline (a comment, which the YAML round trip drops)
    modelines = [
        line
        for line in text.decode("utf-8", "replace").splitlines()
        if line.startswith(MODELINE_PREFIX)
    ]
    sys.stdout.write("".join(line + "\n" for line in modelines[:1]) + migrate_text(text, path))
    return console.EXIT_OK


def _describe(source: Source, main_file: str) -> str:
    """`configs/x.yaml:3`, `configs/tiny.yaml:5 (base file)`, `environment RUN_LR
    (configs/x.yaml:3)`, `command line --training.max_iters`, ..."""
    text = str(source)
    if source.kind == "file" and source.file != main_file:
        text = f"{text}, base file" if source.env else f"{text} (base file)"
    return f"{source.env_text} ({text})" if source.env else text


def _explain(path: str, keys: list[str], flags: list[str]) -> int:
    if not keys:
        raise UsageError(f"explain needs at least one KEY, e.g. {PATH.training.batch_size}")
    resolved = resolve(path, argv=flags)
    values = flat_values(resolved.config)
    unknown = []
    for key in keys:
        canonical = ALIASES.get(key, key)
        if canonical not in FIELDS:
            unknown.append(key)
            continue
        note = f" ({key!r} is an old name of it)" if canonical != key else ""
        print(f"{canonical} = {SPEC.shown_value(canonical, values[canonical])!r}{note}")
        print(f"  from {_describe(resolved.sources[canonical], path)}")
        for location, _, resolution in resolved.sources[canonical].resolved:
            if resolution:  # `2 steps` needs no note
                print(f"  {canonical}{location}: {resolution}" if location else f"  {resolution}")
        for value, source in reversed(resolved.overridden.get(canonical, [])):
            shown = SPEC.shown_value(canonical, value)
            print(f"  overrides {shown!r} from {_describe(source, path)}")
    if unknown:
        raise UsageError(f"unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    return console.EXIT_OK


def _diff(path_a: str, path_b: str, flags: list[str]) -> int:
    a, b = resolve(path_a, argv=flags), resolve(path_b, argv=flags)
    values_a, values_b = flat_values(a.config), flat_values(b.config)
    differing = [path for path in FIELDS if values_a[path] != values_b[path]]
    for path in differing:
        print(
            f"{path}: {SPEC.shown_value(path, values_a[path])!r} ({_describe(a.sources[path], path_a)}) -> "
            f"{SPEC.shown_value(path, values_b[path])!r} ({_describe(b.sources[path], path_b)})"
        )
    if not differing:
        print("no differences")
    return console.EXIT_OK


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return console.EXIT_OK if argv else console.EXIT_USAGE
    command, rest = argv[0], list(argv[1:])
    if command not in COMMANDS:
        raise UsageError(f"unknown config command {command!r}; one of {', '.join(COMMANDS)}")
    arguments, options, _ = COMMANDS[command]
    given = {option for option in options if option in rest}
    rest = [token for token in rest if token not in options]
    positionals, flags, wants_help = SPEC.split_command_line(rest)
    if wants_help:
        print(
            f"usage: python -m runtime config {command} {arguments} {' '.join(f'[{o}]' for o in options)}"
        )
        return console.EXIT_OK
    needed = len(arguments.split())
    if len(positionals) < needed if arguments.endswith("...") else len(positionals) != needed:
        if command != "explain" or not positionals:
            raise UsageError(f"usage: python -m runtime config {command} {arguments}")
    if flags and command == "migrate":
        raise UsageError("migrate rewrites a file as written; it takes no flags")
    if command == "validate":
        return _validate(positionals, flags)
    if command == "show":
        return _show(positionals[0], flags, "--changed" in given)
    if command == "migrate":
        return _migrate(positionals[0])
    if command == "explain":
        return _explain(positionals[0], positionals[1:], flags)
    return _diff(positionals[0], positionals[1], flags)


def main(argv: list[str]) -> int:
    def body() -> int:
        try:
            return _dispatch(list(argv))
        except UsageError as error:
            console.error(PROG, error)
            return console.EXIT_USAGE

    return console.run_command(PROG, body)
