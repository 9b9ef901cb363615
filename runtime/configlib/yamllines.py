"""Safe YAML loading that remembers the line of every mapping key.

Used by the generator to read the spec and by the config engine to read config files.
Only the YAML core types load; any other tag (`!!python/object`, custom tags) is an error.
Plain scalars resolve by YAML 1.2's core schema, as editors and JSON Schema tools read them: `6e-4`
is a number, `yes` and `1:00` are strings, `0o17` and `0x1F` are integers. `017` is an error
(YAML 1.1 reads octal 15, YAML 1.2 reads 17). PyYAML is imported on the first load, not at import:
importing the config package stays cheap.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, NoReturn

from .fields import shown


class LineDict(dict):
    """A dict that knows the 1-based line of itself and of each of its keys."""

    line = 0

    def __init__(self) -> None:
        super().__init__()
        self.key_lines: dict[str, int] = {}


class LineList(list):
    """A list that knows its 1-based line and the line of each item."""

    line = 0

    def __init__(self) -> None:
        super().__init__()
        self.item_lines: list[int] = []


class YAMLLoadError(Exception):
    """A YAML document that could not be read: syntax, an unsafe tag or a duplicate key."""

    def __init__(self, message: str, line: int, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.path = path  # the key path where the problem is, when known


def _path_of(loader: Any, key: object = None) -> str:
    parts = list(getattr(loader, "key_path", []))
    if key is not None:
        parts.append(str(key))
    return ".".join(parts)


def _construct_mapping(loader: Any, node: Any) -> LineDict:
    # `<<: *base` (YAML merge keys): flatten_mapping puts the merged pairs first, later merges
    # before earlier ones; then the mapping's own keys, which override merged ones.
    explicit = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)
    merged = len(node.value) - explicit
    mapping = LineDict()
    mapping.line = node.start_mark.line + 1
    own: set[str] = set()
    path = loader.__dict__.setdefault("key_path", [])
    for index, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise YAMLLoadError(f"keys must be strings, found {shown(key)}", line, _path_of(loader))
        if index >= merged:
            if key in own:
                first = mapping.key_lines[key]
                raise YAMLLoadError(
                    f"duplicate key {key!r} (first given on line {first})",
                    line,
                    _path_of(loader, key),
                )
            own.add(key)
        path.append(key)
        try:
            mapping[key] = loader.construct_object(value_node, deep=True)
        finally:
            path.pop()
        mapping.key_lines[key] = line
    return mapping


def _construct_sequence(loader: Any, node: Any) -> LineList:
    items = LineList()
    items.line = node.start_mark.line + 1
    for item_node in node.value:
        items.append(loader.construct_object(item_node, deep=True))
        items.item_lines.append(item_node.start_mark.line + 1)
    return items


def _reject_tag(loader: Any, tag_suffix: str, node: Any) -> NoReturn:
    raise YAMLLoadError(
        f"unsafe or unknown YAML tag {node.tag!r} rejected; only plain YAML values are allowed",
        node.start_mark.line + 1,
    )


_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9]+$")
_AMBIGUOUS_TAG = "tag:deepseek-moe,2026:leading-zero"
_CORE_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _construct_bool(loader: Any, node: Any) -> bool:
    return loader.construct_scalar(node).lower() == "true"


def _construct_int(loader: Any, node: Any) -> int:
    return int(loader.construct_scalar(node), 0)


def _construct_float(loader: Any, node: Any) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return float(text.replace(".inf", "inf"))
    if text == ".nan":
        return math.nan
    return float(text)


def _reject_leading_zero(loader: Any, node: Any) -> NoReturn:
    text = loader.construct_scalar(node)
    raise YAMLLoadError(
        f"{text!r}: a number with a leading zero is ambiguous (YAML 1.1 reads it as octal); "
        f"write {text.lstrip('+-0') or '0'}, 0o{text.lstrip('+-0')} or a quoted string",
        node.start_mark.line + 1,
    )


@functools.cache
def _loader() -> Any:
    import yaml

    # libyaml's parser when PyYAML has it (several times faster); same constructors either way.
    base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):
        pass

    # YAML 1.2 core schema for booleans and numbers instead of PyYAML's YAML 1.1 resolvers.
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _CORE_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(_CORE_TAGS[0], _BOOL, list("tTfF"))
    Loader.add_implicit_resolver(_AMBIGUOUS_TAG, _LEADING_ZERO, list("-+0"))
    Loader.add_implicit_resolver(_CORE_TAGS[1], _INT, list("-+0123456789"))
    Loader.add_implicit_resolver(_CORE_TAGS[2], _FLOAT, list("-+.0123456789"))
    Loader.add_constructor(_CORE_TAGS[0], _construct_bool)
    Loader.add_constructor(_CORE_TAGS[1], _construct_int)
    Loader.add_constructor(_CORE_TAGS[2], _construct_float)
    Loader.add_constructor(_AMBIGUOUS_TAG, _reject_leading_zero)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
    Loader.add_multi_constructor("", _reject_tag)
    Loader.add_constructor(None, lambda loader, node: _reject_tag(loader, "", node))
    return Loader


MAX_DOCUMENT_BYTES = 256 << 10
"""Largest config document read (256 KiB; a full config is a few KiB): bigger input is an error."""

MAX_DOCUMENT_VALUES = 100_000
"""Most values a document may expand to. YAML aliases let a few hundred bytes stand for billions
of values (an "alias bomb"); the expansion is counted, never built."""


def _check_expansion(document: Any) -> None:
    count, stack = 0, [document]
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_DOCUMENT_VALUES:
            raise YAMLLoadError(
                f"the document expands to more than {MAX_DOCUMENT_VALUES} values (through YAML "
                f"aliases?); a config has a few hundred",
                getattr(document, "line", 1) or 1,
            )
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def load_yaml(text: str | bytes) -> Any:
    """Parse one YAML document into LineDict/LineList/scalars; None for an empty document.

    Bounded: at most MAX_DOCUMENT_BYTES of input, expanding to at most MAX_DOCUMENT_VALUES values."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise YAMLLoadError(
            f"the document has {len(text):,} bytes; config documents are limited to "
            f"{MAX_DOCUMENT_BYTES:,} bytes ({MAX_DOCUMENT_BYTES >> 10} KiB)",
            1,
        )
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise YAMLLoadError(
                f"file is not valid UTF-8 ({error.reason} at byte {error.start})", 1
            ) from None
    import yaml

    try:
        document = yaml.load(text, Loader=_loader())
        _check_expansion(document)
        return document
    except YAMLLoadError:
        raise
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = " ".join(part for part in (error.context, error.problem) if part)
        raise YAMLLoadError(f"YAML syntax error: {problem}", line) from None
    except yaml.YAMLError as error:
        raise YAMLLoadError(f"YAML error: {error}", 1) from None
    except RecursionError:
        raise YAMLLoadError("YAML document nested too deeply", 1) from None
