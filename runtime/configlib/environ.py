"""Environment references in config values: `${env:NAME}` and `${env:NAME,default}`.

A value that holds `${env:` (in a file, a flag or the items of a list) is read from the
environment when the config is resolved: each reference is replaced by the variable's value (or by
its default when the variable is unset), and the resulting text is read the way the same text
given as a `--section.field` flag is read, with the field's type: `lr: ${env:LR}` gives a float,
`out_dir: ${env:SCRATCH}/runs/x` a path, `tags: ${env:TAGS}` (`a,b`) a list. The value is then
checked like any other. References may stand for a field's whole value, an item of a list field,
or a key's value in an item of a list[record] field; they are not read in keys, `base:` or
`spec_version`.

    NAME     letters, digits and _, not starting with a digit
    default  any text without `}` (may be empty: `${env:SUFFIX,}`)

A variable that is unset and has no default, or a `${env:` that does not start a well-formed
reference, is a config problem (kind "env") naming the variable and where it was written. The
values of variables are not read for references again. Saved dicts (a checkpoint's config) hold
resolved values and are not read for references.

The source of a value read from the environment names the variables (`Source.env`); `config
explain` and the comments of `dump_yaml` show them. A resolved config's sources are remembered
for the config object (`remember_sources`), so that `dump_yaml(config)` can write them.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .errors import Problem, Problems, Source
from .fields import ENV_START, SECRET_PLACEHOLDER, FieldSpec, RecordSpec, shown
from .flags import item_spec, parse_flag_value
from .layers import Assignment, Layer
from .yamllines import LineDict, LineList

if TYPE_CHECKING:
    from .engine import ConfigSpec

NAME = r"[A-Za-z_][A-Za-z0-9_]*"
REFERENCE = re.compile(r"\$\{env:(" + NAME + r")(?:,([^}]*))?\}")
"""One well-formed reference: group 1 the variable, group 2 the default (None without a comma)."""

SCHEMA_TRIGGER = r"\$\{env:"
"""A JSON Schema pattern of a string that holds a reference (well-formed or not)."""

SCHEMA_PATTERN = r"^(?:[^$]|\$(?!\{env:)|\$\{env:" + NAME + r"(?:,[^}]*)?\})*$"
"""A JSON Schema pattern of a string whose every `${env:` starts a well-formed reference (the
same tokenization as `interpolate`: left to right, a default ends at the first `}`)."""


@dataclass
class Reads:
    """What reading one value from the environment found."""

    names: list[str] = field(default_factory=list)  # variables referenced, in order, once each
    unset: list[str] = field(default_factory=list)  # of them, unset ones whose default was used
    problems: list[str] = field(default_factory=list)

    def note(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)


def mentions_env(value: Any) -> bool:
    """Whether a value (a string, or lists and mappings of them, nested to any depth) holds
    `${env:` anywhere."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if ENV_START in item:
                return True
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def interpolate(text: str, environ: Mapping[str, str], reads: Reads) -> str | None:
    """The text with each reference replaced; None (and `reads.problems`) if a variable without a
    default is unset or a reference is malformed."""
    parts: list[str] = []
    position = 0
    ok = True
    while True:
        start = text.find(ENV_START, position)
        if start < 0:
            parts.append(text[position:])
            break
        match = REFERENCE.match(text, start)
        if match is None:
            reads.problems.append(
                f"malformed environment reference {shown(text[start : start + 40])}: write "
                f"${{env:NAME}} or ${{env:NAME,default}} (NAME: letters, digits and _, not "
                f"starting with a digit; a default cannot hold '}}')"
            )
            return None
        parts.append(text[position:start])
        name, default = match.group(1), match.group(2)
        reads.note(name)
        if name in environ:
            parts.append(environ[name])
        elif default is not None:
            parts.append(default)
            if name not in reads.unset:
                reads.unset.append(name)
        else:
            reads.problems.append(
                f"environment variable {name} is not set, and ${{env:{name}}} gives no default "
                f"(set it, or write ${{env:{name},VALUE}})"
            )
            ok = False
        position = match.end()
    return "".join(parts) if ok else None


def expand_value(spec: FieldSpec, value: Any, environ: Mapping[str, str], reads: Reads) -> Any:
    """A field's value with its references read, in the field's type (problems in `reads`).
    Line-tracking lists and mappings stay line-tracking (problems of a record's key still name
    its line)."""
    if isinstance(value, str):
        if ENV_START not in value:
            return value
        text = interpolate(value, environ, reads)
        return value if text is None else parse_flag_value(spec, text)
    if not isinstance(value, list):
        return value
    if spec.record is not None:
        return _like(
            value, [_expand_record_item(spec.record, item, environ, reads) for item in value]
        )
    if spec.is_list:
        item = item_spec(spec.item_type)
        return _like(value, [expand_value(item, inner, environ, reads) for inner in value])
    return value


def _expand_record_item(
    record: RecordSpec, item: Any, environ: Mapping[str, str], reads: Reads
) -> Any:
    if not isinstance(item, Mapping):
        return item
    known = {f.name: f for f in record.fields}
    expanded = LineDict()
    if isinstance(item, LineDict):
        expanded.line, expanded.key_lines = item.line, dict(item.key_lines)
    for key, inner in item.items():
        spec = known.get(key)
        expanded[key] = expand_value(spec, inner, environ, reads) if spec else inner
    return expanded


def _like(original: list, items: list) -> list:
    """`items` in a list of the original's kind (a LineList keeps its lines)."""
    if not isinstance(original, LineList):
        return items
    copy = LineList()
    copy.line, copy.item_lines = original.line, list(original.item_lines)
    copy.extend(items)
    return copy


def expand_layers(
    spec: ConfigSpec,
    layers: list[Layer],
    problems: Problems,
    environ: Mapping[str, str] | None = None,
) -> tuple[list[Layer], set[str]]:
    """The layers with every reference read (a secret field given as SECRET_PLACEHOLDER dropped),
    and the fields whose reference could not be read (reported in `problems`)."""
    environ = os.environ if environ is None else environ
    result: list[Layer] = []
    unreadable: set[str] = set()
    for layer in layers:
        copy = replace(layer, assignments=[])
        for item in layer.assignments:
            field_spec = spec.fields[item.path]
            if field_spec.secret and item.value == SECRET_PLACEHOLDER:
                continue  # what a saved config writes for a secret: no value
            if not layer.environment or not mentions_env(item.value):
                copy.assignments.append(item)
                continue
            reads = Reads()
            value = expand_value(field_spec, item.value, environ, reads)
            source = replace(item.source, env=tuple(reads.names), env_unset=tuple(reads.unset))
            if reads.problems:
                for message in reads.problems:
                    problems.append(Problem(item.path, message, source, "env"))
                unreadable.add(item.path)
                continue
            copy.assignments.append(Assignment(item.path, value, source, item.written))
        result.append(copy)
    return result, unreadable


# ----- the sources of resolved configs, for dump_yaml ----------------------------------------------

_REMEMBERED: OrderedDict[int, tuple[Any, dict[str, Source]]] = OrderedDict()
_REMEMBER_AT_MOST = 32


def remember_sources(config: Any, sources: Mapping[str, Source]) -> None:
    """Keep the environment sources of a resolved config (for `dump_yaml(config)`, which gets the
    config alone). Only configs that read the environment are kept, the most recent few; the
    entry holds the config, so its id is not reused while the entry lives."""
    read = {path: source for path, source in sources.items() if source.env or source.resolved}
    if not read:
        return
    _REMEMBERED[id(config)] = (config, read)
    _REMEMBERED.move_to_end(id(config))
    while len(_REMEMBERED) > _REMEMBER_AT_MOST:
        _REMEMBERED.popitem(last=False)


def env_sources(config: Any) -> dict[str, Source]:
    """{field path: Source} of the values of a resolved config read from the environment (empty
    for a config that read none, or that was built in code)."""
    return {path: source for path, source in remembered_sources(config).items() if source.env}


def remembered_sources(config: Any) -> dict[str, Source]:
    """{field path: Source} of the values of a resolved config read from the environment or
    written as counts with a unit (empty for a config built in code)."""
    entry = _REMEMBERED.get(id(config))
    if entry is None or entry[0] is not config:
        return {}
    return dict(entry[1])
