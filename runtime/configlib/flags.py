"""Command-line flags: `--section.field VALUE` for every field, its old names and section
shorthands. Maps flag names to field paths, splits a command line into positional arguments and
flags, reads flags into the last layer (values parsed as YAML would parse them), and builds the
argparse parser whose --help lists them.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import Problem, Problems, Source
from .fields import ENV_START, FieldSpec
from .layers import Assignment, Layer, Rename
from .values import join_path
from .yamllines import YAMLLoadError, load_yaml

if TYPE_CHECKING:
    from .engine import ConfigSpec

_ITEM = {
    name: FieldSpec(path="", name="", type=name, nullable=False, default=None, doc="")
    for name in ("int", "float", "bool", "str", "steps", "tokens")
}


def item_spec(type_name: str) -> FieldSpec:
    """A nameless field of one item type (int, float, bool, str): how an item of a list is read."""
    return _ITEM[type_name]


def flag_paths(spec: ConfigSpec) -> dict[str, str]:
    """Command-line flag (without --) -> canonical field path: every field, its old names,
    section shorthands, and all of these under an old section name (`lr_schedule.min_lr`)."""
    flags = {path: path for path in spec.fields}
    for alias, canonical in spec.aliases.items():
        if canonical in spec.fields:
            flags[alias] = canonical
    for path, section in spec.sections.items():
        if section.shorthand is not None:
            flags[path] = join_path(path, section.shorthand)
    for alias, canonical in spec.aliases.items():
        if canonical in spec.sections:
            prefix = canonical + "."
            for flag, target in list(flags.items()):
                if flag.startswith(prefix):
                    flags.setdefault(alias + "." + flag[len(prefix) :], target)
                elif flag == canonical:  # the shorthand
                    flags.setdefault(alias, target)
    return flags


def parse_flag_value(field_spec: FieldSpec, text: str) -> Any:
    """A flag's text as the value YAML would give it. A str field takes the text as is (null
    and ~ are null, as in a file); a list field also takes `a,b` for `[a, b]`. A list[record]
    field takes YAML flow syntax (`[{path: a, weight: 0.7}, {path: b}]`); empty text is `[]`."""
    if field_spec.record is not None:
        if not text.strip():
            return []
        try:
            return load_yaml(text)
        except YAMLLoadError as error:
            return f"<unparsable: {error.message}>"
    if field_spec.is_list and not text.lstrip().startswith("["):
        items = [item.strip() for item in text.split(",")] if text.strip() else []
        item_type = field_spec.item_type
        return [
            item if item_type == "str" else parse_flag_value(_ITEM[item_type], item)
            for item in items
        ]
    if field_spec.type == "str":
        return None if text in ("null", "~") else text
    try:
        return load_yaml(text)
    except YAMLLoadError as error:
        return f"<unparsable: {error.message}>"


def is_bool_flag(spec: ConfigSpec, name: str) -> bool:
    path = spec.flags.get(name)
    return path is not None and spec.fields[path].type == "bool"


def split_command_line(spec: ConfigSpec, argv: Sequence[str]) -> tuple[list[str], list[str], bool]:
    """(positional arguments, config flags, whether help was asked for) of a command line
    whose flags may come before, between or after its positional arguments. A bool flag
    without a value (`--overwrite`) means true."""
    positionals: list[str] = []
    flags: list[str] = []
    wants_help = False
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if token in ("-h", "--help"):
            wants_help = True
        elif token.startswith("--") and len(token) > 2:
            name, has_value, _ = token[2:].partition("=")
            if has_value:
                flags.append(token)
            elif is_bool_flag(spec, name) and (index == len(argv) or argv[index].startswith("--")):
                flags += [token, "true"]
            elif index < len(argv):
                flags += [token, argv[index]]
                index += 1
            else:
                flags.append(token)  # reported as "flag needs a value"
        else:
            positionals.append(token)
    return positionals, flags, wants_help


def _old_names_in(spec: ConfigSpec, flag: str) -> list[tuple[str, str]]:
    """(old name, canonical) pairs a flag uses: an old section name, an old field name."""
    found = []
    parts = flag.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if spec.aliases.get(prefix) in spec.sections:
            found.append((prefix, spec.aliases[prefix]))
            flag = join_path(spec.aliases[prefix], ".".join(parts[cut:]))
            break
    if flag in spec.aliases:
        found.append((flag, spec.aliases[flag]))
    return found


def read_argv(spec: ConfigSpec, argv: Iterable[str], problems: Problems) -> Layer:
    """The layer of `--section.field VALUE` (or `--section.field=VALUE`) flags; later flags win."""
    layer = Layer()
    items = list(argv)
    index = 0
    while index < len(items):
        token = items[index]
        index += 1
        if not token.startswith("--") or len(token) == 2:
            message = f"unexpected argument {token!r}; flags look like --section.field VALUE"
            problems.append(Problem("", message, Source("cli", flag=token), "key"))
            continue
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if index < len(items) and not (
                items[index].startswith("--") and is_bool_flag(spec, name)
            ):
                value = items[index]
                index += 1
            elif is_bool_flag(spec, name):
                value = "true"  # `--overwrite` alone
            else:
                problems.append(
                    Problem(name, "flag needs a value", Source("cli", flag=token), "value")
                )
                continue
        source = Source("cli", flag=f"--{name}")
        if name not in spec.flags:
            hint = ""
            if not problems.full:
                import difflib  # only on errors

                close = difflib.get_close_matches(name, list(spec.flags), n=1, cutoff=0.6)
                hint = f"; did you mean --{close[0]}?" if close else ""
            problems.append(Problem(name, f"unknown flag --{name}{hint}", source, "key"))
            continue
        canonical = spec.flags[name]
        layer.renames += [Rename(old, new, source) for old, new in _old_names_in(spec, name)]
        # a flag with `${env:...}` keeps its text: the whole text is read once the variables are
        # (environ.py), so `--wandb.tags 'a,${env:TAG}'` and `${env:X,a: b}` read as written
        parsed = value if ENV_START in value else parse_flag_value(spec.fields[canonical], value)
        layer.assignments.append(Assignment(canonical, parsed, source, name))
    return layer


def build_arg_parser(spec: ConfigSpec, prog: str) -> argparse.ArgumentParser:
    """An argparse parser with one --section.field flag per field, for --help text."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Flags override the config file; later flags win.",
        allow_abbrev=False,
    )
    parser.add_argument("config", nargs="?", help="YAML config file")
    for path, section in spec.sections.items():
        if not path:
            continue
        group = parser.add_argument_group(path, section.doc)
        for name in section.fields:
            _add_flag(group, spec.fields[join_path(path, name)])
    group = parser.add_argument_group("root", spec.sections[""].doc)
    for name in spec.sections[""].fields:
        _add_flag(group, spec.fields[name])
    return parser


def _add_flag(group: argparse._ArgumentGroup, field_spec: FieldSpec) -> None:
    aliases = [f"--{alias}" for alias in field_spec.aliases]
    extra = f" Old names: {', '.join(aliases)}." if aliases else ""
    choices = f" One of: {', '.join(map(str, field_spec.choices))}." if field_spec.choices else ""
    if field_spec.record is not None:
        keys = ", ".join(
            f"{f.name}: {f.type_text.upper()}" + ("" if f.required else f" = {f.default!r}")
            for f in field_spec.record.fields
        )
        choices = f" Each item: {{{keys}}}; give the list in YAML flow syntax, '[{{...}}, ...]'."
    help_text = f"{field_spec.doc}{choices} Default: {field_spec.default!r}.{extra}"
    group.add_argument(
        f"--{field_spec.path}",
        metavar=field_spec.type_text.upper(),
        help=help_text.replace("%", "%%"),
    )
