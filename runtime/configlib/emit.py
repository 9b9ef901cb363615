"""Writing configs out: a config as a plain dict, as flat {field path: value}, as the dict saved
with a checkpoint (with its spec version, secret fields replaced by a placeholder), as canonical
YAML (with a comment naming the environment variable a value was read from); nesting flat values
by section; and migrating a config file's text to canonical names (references kept as written).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .environ import env_sources, remembered_sources
from .errors import ConfigError, Problem, Problems, Source
from .fields import SECRET_PLACEHOLDER, shown
from .layers import BASE_KEY, VERSION_KEY, Assignment, Layer, walk_mapping
from .quantities import as_written
from .values import coerce, get_path, record_items
from .yamllines import LineDict, YAMLLoadError, load_yaml

if TYPE_CHECKING:
    from .engine import ConfigSpec


def config_to_dict(config: Any) -> dict:
    """A plain nested dict of a config, canonical names, spec order."""
    return dataclasses.asdict(config)


def flat_values(spec: ConfigSpec, config: Any) -> dict[str, Any]:
    """{dotted field path: value} of a config, in spec order. The items of a list[record] field
    are plain dicts of their keys (as in a config file), not the record's dataclasses."""
    values = {}
    for path, field_spec in spec.fields.items():
        value = get_path(config, path)
        values[path] = record_items(field_spec, value) if field_spec.record else value
    return values


def to_saved_dict(spec: ConfigSpec, config: Any) -> dict:
    """The dict to store with a checkpoint: the config plus the spec version it was written for.
    A secret field's value is SECRET_PLACEHOLDER (null stays null): loading the dict leaves it
    unset, so a resumed run takes it from its own config or environment."""
    tree = config_to_dict(config)
    for path in spec.secret_paths:
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node[part]
        if node[leaf] is not None:
            node[leaf] = SECRET_PLACEHOLDER
    return {VERSION_KEY: spec.version, **tree}


def _yaml_text(tree: Mapping) -> str:
    import yaml

    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_yaml(spec: ConfigSpec, config: Any) -> str:
    """Canonical YAML of a resolved config; loading it gives an equal config (but for secret
    fields, written as SECRET_PLACEHOLDER). A value read from the environment has a comment line
    above its key naming the variables and where the reference was written."""
    tree = to_saved_dict(spec, config)
    for path, source in remembered_sources(config).items():
        for location, written, _ in source.resolved:
            _put_written(tree, path, location, written)
    text = _yaml_text(tree)
    notes = {path: f"from {source.describe()}" for path, source in env_sources(config).items()}
    return _with_comments(text, notes) if notes else text


def _put_written(tree: dict, path: str, location: str, written: str) -> None:
    """Write a count as it was written (`14.3T tokens`) over its resolved value in a nested dict:
    at `path`, then `location` ("", "[2]" or "[1].until")."""
    *parents, leaf = path.split(".")
    node: Any = tree
    for part in parents:
        node = node[part]
    if not location:
        node[leaf] = written
        return
    node = node[leaf]
    index_text, _, key = location[1:].partition("]")
    if key:
        node[int(index_text)][key.lstrip(".")] = written
    else:
        node[int(index_text)] = written


def _with_comments(text: str, notes: Mapping[str, str]) -> str:
    """YAML text with a comment line above the key of each field path in `notes` (as it is if
    the text is beyond what the loader reads back: comments are a courtesy)."""
    try:
        document = load_yaml(text)
    except YAMLLoadError:
        return text
    lines = text.splitlines(keepends=True)
    above: dict[int, str] = {}  # 0-based line -> comment
    for path, note in notes.items():
        node = document
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, LineDict) else None
        if not isinstance(node, LineDict) or leaf not in node.key_lines:
            continue
        index = node.key_lines[leaf] - 1
        indent = lines[index][: len(lines[index]) - len(lines[index].lstrip(" "))]
        above[index] = f"{indent}# {' '.join(note.split())}\n"
    return "".join(above.get(index, "") + line for index, line in enumerate(lines))


def nest(spec: ConfigSpec, values: Mapping[str, Any]) -> dict:
    """A nested dict, sections in spec order, of {dotted field path: value}."""
    tree: dict = {}
    for path in sorted(values, key=spec.field_order.__getitem__):
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = values[path]
    return tree


def migrate_text(spec: ConfigSpec, text: str | bytes, filename: str) -> str:
    """The same config with every old name rewritten to its canonical key; values unchanged."""
    problems = Problems()
    try:
        document = load_yaml(text)
    except YAMLLoadError as error:
        raise ConfigError(
            [Problem("", error.message, Source("file", filename, error.line), "file")]
        ) from None
    if document is None:
        return ""
    if not isinstance(document, LineDict):
        raise ConfigError(
            [
                Problem(
                    "",
                    "a config file must be a mapping of sections",
                    Source("file", filename, 1),
                    "key",
                )
            ]
        )
    layer = Layer()
    walk_mapping(spec, document, "", filename, layer, problems)
    if problems:
        raise ConfigError(problems)
    assignments = []
    seen: dict[str, Assignment] = {}
    for item in layer.assignments:
        coerced = as_written(coerce(spec.fields[item.path], item.value))
        item.value = list(coerced) if isinstance(coerced, list) else coerced
        if item.path in seen:
            first = seen[item.path]
            if first.value != item.value:
                message = f"given twice with different values: {first.written!r} = {shown(first.value)} ({first.source}) and {item.written!r} = {shown(item.value)}"
                problems.append(Problem(item.path, message, item.source, "duplicate"))
            continue
        seen[item.path] = item
        assignments.append(item)
    if problems:
        raise ConfigError(problems)
    tree = {
        VERSION_KEY: spec.version,
        **nest(spec, {item.path: item.value for item in assignments}),
    }
    if BASE_KEY in document:
        tree = {BASE_KEY: document[BASE_KEY], **tree}
    return _yaml_text(tree)
