"""Reading config sources into layers: YAML files (with their `base:` files), YAML text, dicts.

A `Layer` is what one source assigns, each value under its canonical field path with the file and
line it came from, plus the old names (`Rename`) it used. Reading only maps keys to fields; values
are checked when the layers are merged (resolve.py). Problems are collected, not raised.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import Problem, Problems, Source
from .fields import shown
from .quantities import TYPE_WORDS
from .values import join_path, last_key, parent_path
from .yamllines import MAX_DOCUMENT_BYTES, LineDict, YAMLLoadError, load_yaml

if TYPE_CHECKING:
    from .engine import ConfigSpec

BASE_KEY = "base"
"""Root key naming the files a config file builds on (paths relative to the file)."""

VERSION_KEY = "spec_version"
"""Root key recording the spec version a config was written for (saved configs always have it)."""

RESERVED_KEYS = (BASE_KEY, VERSION_KEY)


@dataclass
class Assignment:
    path: str  # canonical field path
    value: Any
    source: Source
    written: str  # the key path as the user wrote it


@dataclass
class Rename:
    written: str  # the old key path as written
    canonical: str
    source: Source


@dataclass
class Layer:
    """What one source (a file or the command line) assigns, and the old names it used."""

    assignments: list[Assignment] = field(default_factory=list)
    renames: list[Rename] = field(default_factory=list)
    spec_version: int | None = None  # as declared by the source, if it did
    origin: str | None = None  # absolute path of a base file
    environment: bool = True  # whether `${env:...}` in its values is read (not in a saved dict)


def last_of_each(layers: list[Layer]) -> list[Layer]:
    """The layers with each file's layer kept at its last place only (a base reached twice
    applies once, where it wins; the result is the same, without exponential repetition)."""
    last = {id(layer): index for index, layer in enumerate(layers)}
    return [layer for index, layer in enumerate(layers) if last[id(layer)] == index]


def names_in(spec: ConfigSpec, section_path: str) -> set[str]:
    """Keys that may appear directly in a section: fields, subsections and aliases there."""
    section = spec.sections[section_path]
    names = set(section.fields) | set(section.sections)
    names |= {last_key(alias) for alias in spec.aliases if parent_path(alias) == section_path}
    if section_path == "":
        names.update(RESERVED_KEYS)
    return names


def unknown_key_message(spec: ConfigSpec, key: str, section_path: str, cheap: bool = False) -> str:
    where = f"section {section_path!r}" if section_path else "the root"
    if cheap or len(key) > 64:  # past the shown problems, or no field name is this long
        return f"unknown key {shown(key)} in {where}"
    import difflib  # only on errors

    candidates = sorted(names_in(spec, section_path))
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    homes = sorted(p for p in list(spec.fields) + list(spec.sections) if p and last_key(p) == key)
    if homes:
        return f"unknown key {key!r} in {where}; {key!r} belongs in {parent_path(homes[0]) or 'the root'!r} (write it as {homes[0]})"
    if close:
        return f"unknown key {key!r} in {where}; did you mean {close[0]!r}?"
    return f"unknown key {key!r} in {where}; expected one of {', '.join(candidates)}"


def walk_mapping(
    spec: ConfigSpec,
    mapping: LineDict,
    section_path: str,
    file: str,
    layer: Layer,
    problems: Problems,
) -> None:
    """Turn one YAML mapping into assignments to canonical field paths."""
    for key, value in mapping.items():
        line = mapping.key_lines.get(key, mapping.line)
        source = Source("file", file, line)
        written = join_path(section_path, key)
        if section_path == "" and key in RESERVED_KEYS:
            continue
        canonical = spec.aliases.get(written, written)
        if canonical != written:
            layer.renames.append(Rename(written, canonical, source))
        if canonical in spec.sections:
            _assign_section(spec, canonical, value, source, written, layer, problems, file)
        elif canonical in spec.fields:
            field_spec = spec.fields[canonical]
            if isinstance(value, dict) and field_spec.record is not None:
                found = ", ".join(shown(k, 30) for k in list(value)[:5])
                message = (
                    f"expected a list of {field_spec.record.name} items, found a single mapping "
                    f"with keys {found}; start each item with `- ` (or write [{{...}}, ...])"
                )
                problems.append(Problem(canonical, message, source, "value"))
            elif isinstance(value, dict):
                type_text = TYPE_WORDS.get(field_spec.type, field_spec.type_text)
                found = ", ".join(shown(k, 30) for k in list(value)[:5])
                message = f"is a single {type_text} value, not a section; found a mapping with keys {found}"
                problems.append(Problem(canonical, message, source, "key"))
            else:
                layer.assignments.append(Assignment(canonical, value, source, written))
        else:
            message = unknown_key_message(spec, key, section_path, cheap=problems.full)
            problems.append(Problem(written, message, source, "key"))


def _assign_section(
    spec: ConfigSpec,
    section_path: str,
    value: Any,
    source: Source,
    written: str,
    layer: Layer,
    problems: Problems,
    file: str,
) -> None:
    section = spec.sections[section_path]
    if isinstance(value, LineDict):
        walk_mapping(spec, value, section_path, file, layer, problems)
    elif value is None:
        return  # `model:` with nothing under it
    elif section.shorthand is not None and not isinstance(value, (dict, list)):
        layer.assignments.append(
            Assignment(join_path(section_path, section.shorthand), value, source, written)
        )
    else:
        hint = ""
        if section.shorthand:
            shorthand = spec.fields[join_path(section_path, section.shorthand)]
            hint = f" (or a {shorthand.type_text} for {section.shorthand!r})"
        example = ", ".join((section.fields + section.sections)[:3])
        message = f"is a section: expected a mapping of its keys ({example}, ...){hint}, found {shown(value)}"
        problems.append(Problem(section_path, message, source, "key"))


def read_file_layers(
    spec: ConfigSpec,
    path: str,
    problems: Problems,
    stack: list[str],
    cache: dict[str, list[Layer]],
) -> list[Layer]:
    """Layers of a file and of its bases, base files first. Each file is read once per
    resolve (`cache`), and a file reached twice keeps only its last place in the order."""
    absolute = os.path.abspath(path)
    if absolute in stack:
        chain = " -> ".join(os.path.relpath(p) for p in stack[stack.index(absolute) :] + [absolute])
        problems.append(
            Problem(BASE_KEY, f"base files form a cycle: {chain}", Source("file", path, 1), "file")
        )
        return []
    if absolute in cache:
        return cache[absolute]
    try:
        if os.path.getsize(path) > MAX_DOCUMENT_BYTES:  # checked before reading it all
            size = os.path.getsize(path)
            message = f"the file has {size:,} bytes; config files are limited to {MAX_DOCUMENT_BYTES:,} bytes ({MAX_DOCUMENT_BYTES >> 10} KiB)"
            problems.append(Problem("", message, Source("file", path, 1), "file"))
            cache[absolute] = []
            return []
        with open(path, "rb") as config_file:
            data = config_file.read()
    except OSError as error:
        what = (
            "a folder, not a config file" if os.path.isdir(path) else error.strerror or str(error)
        )
        problems.append(
            Problem("", f"cannot read config file: {what}", Source("file", path, 1), "file")
        )
        cache[absolute] = []
        return []
    layers = read_text_layers(spec, data, path, problems, stack + [absolute], cache)
    for layer in layers:
        layer.origin = layer.origin or absolute
    cache[absolute] = layers
    return layers


def read_text_layers(
    spec: ConfigSpec,
    text: str | bytes,
    filename: str,
    problems: Problems,
    stack: list[str],
    cache: dict[str, list[Layer]],
) -> list[Layer]:
    """Layers of YAML text and of its bases, base files first (`stack`: the files being read,
    empty for text given directly, whose bases are relative to the working folder)."""
    try:
        document = load_yaml(text)
    except YAMLLoadError as error:
        problems.append(
            Problem(error.path, error.message, Source("file", filename, error.line), "file")
        )
        return []
    if document is None:
        return []
    if not isinstance(document, LineDict):
        where = Source("file", filename, getattr(document, "line", 1))
        message = f"a config file must be a mapping of sections, found {type(document).__name__}"
        problems.append(Problem("", message, where, "key"))
        return []
    layers = []
    if BASE_KEY in document:
        layers += _read_bases(spec, document, filename, problems, stack, cache)
    layer = Layer(spec_version=declared_version(spec, document, filename, problems))
    layer.origin = os.path.abspath(filename) if stack else None
    walk_mapping(spec, document, "", filename, layer, problems)
    return last_of_each(layers + [layer])


def _read_bases(
    spec: ConfigSpec,
    document: LineDict,
    filename: str,
    problems: Problems,
    stack: list[str],
    cache: dict[str, list[Layer]],
) -> list[Layer]:
    bases = document[BASE_KEY]
    source = Source("file", filename, document.key_lines[BASE_KEY])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        message = f"expected a file name or a list of file names, found {shown(bases)}"
        problems.append(Problem(BASE_KEY, message, source, "value"))
        return []
    layers = []
    folder = os.path.dirname(filename) if stack else os.getcwd()
    for base in list(dict.fromkeys(reversed(bases)))[::-1]:  # listed twice: the last place wins
        base_path = os.path.join(folder, base)
        if not os.path.isfile(base_path):
            message = f"base file {base!r} not found (looked for {base_path})"
            problems.append(Problem(BASE_KEY, message, source, "file"))
            continue
        layers += read_file_layers(spec, base_path, problems, stack, cache)
    return last_of_each(layers)


def declared_version(
    spec: ConfigSpec, mapping: Mapping, filename: str, problems: Problems
) -> int | None:
    """The spec version a source declares (`spec_version:`), if any and if valid."""
    if VERSION_KEY not in mapping:
        return None
    version = mapping[VERSION_KEY]
    source = Source("file", filename, getattr(mapping, "key_lines", {}).get(VERSION_KEY, 0))
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        message = f"expected a spec version (a positive integer), found {shown(version)}"
        problems.append(Problem(VERSION_KEY, message, source, "value"))
        return None
    if version > spec.version:
        message = f"written for spec version {version}, newer than this code's version {spec.version}; update the code"
        problems.append(Problem(VERSION_KEY, message, source, "value"))
        return None
    return version


def dict_layer(spec: ConfigSpec, mapping: Mapping, problems: Problems) -> Layer:
    """The layer of a plain nested dict (e.g. one saved in a checkpoint)."""
    layer = Layer(
        spec_version=declared_version(spec, mapping, "<dict>", problems), environment=False
    )
    _flatten(spec, mapping, "", layer, problems)
    return layer


def _flatten(
    spec: ConfigSpec, mapping: Mapping, prefix: str, layer: Layer, problems: Problems
) -> None:
    source = Source("file", "<dict>", 0)
    for key, value in mapping.items():
        if not prefix and key in RESERVED_KEYS:
            continue
        written = join_path(prefix, key)
        path = spec.aliases.get(written, written)
        if path != written:
            layer.renames.append(Rename(written, path, source))
        if path in spec.sections and isinstance(value, dict):
            _flatten(spec, value, path, layer, problems)
        elif path in spec.fields:
            layer.assignments.append(Assignment(path, value, source, written))
        else:
            problems.append(Problem(path, unknown_key_message(spec, key, prefix), None, "key"))
