"""What the spec says about each field, section and rule, and the one value check.

The generator reads the spec into these objects to validate defaults and choices; the generated
tables (generated/config.py, generated/parser.py) are built from them, so the spec's defaults and
the user's values pass exactly the same check.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(kw_only=True)
class FieldSpec:
    """One config field as the spec declares it."""

    path: str  # dotted from the root, e.g. "system.device.dtype"
    name: str
    type: str  # int | float | bool | str | list[int] | list[float] | list[str]
    nullable: bool
    default: Any
    doc: str
    aliases: tuple[str, ...] = ()  # full dotted paths of the old names
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    policy: str = "overridable"  # on resume: must_match | from_checkpoint | overridable
    hf: str | None = None  # the Hugging Face config.json name, if the field has one
    sentinels: tuple[tuple[str, str], ...] = ()  # (value, meaning) of special string values
    derived: str | None = None  # expression giving the value when it is null
    pattern: str | None = None  # regular expression a str value (or each item) must match fully
    pattern_doc: str | None = None  # the pattern in words, for messages

    @property
    def is_list(self) -> bool:
        return self.type.startswith("list[")

    @property
    def item_type(self) -> str:
        return self.type[5:-1] if self.is_list else self.type

    @property
    def type_text(self) -> str:
        return self.type + ("?" if self.nullable else "")


@dataclass(frozen=True)
class SectionSpec:
    """One section: its dataclass, field names and child section names, in spec order."""

    path: str  # "" for the root
    cls: type
    doc: str
    fields: tuple[str, ...]
    sections: tuple[str, ...]
    shorthand: str | None
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """A cross-field check, evaluated once every field holds a valid value."""

    check: str  # the spec's expression, shown in the error
    when: str | None
    message: str
    paths: tuple[str, ...]  # the fields it reads
    holds: Callable[[Any], bool]  # Config -> bool
    applies: Callable[[Any], bool] | None  # Config -> bool, or None for always


@dataclass(frozen=True)
class Derived:
    """A field whose null means "computed from other fields" (a derived default)."""

    expression: str  # the spec's expression, shown as the value's source
    paths: tuple[str, ...]  # the fields it reads
    compute: Callable[[Any], Any]  # Config -> value


def check_value(spec: FieldSpec, value: Any, check_choices: bool = True) -> str | None:
    """Why `value` does not fit the field's type and constraints, or None if it does. Bounds and
    patterns of a list field apply to each item."""
    if value is None:
        return None if spec.nullable else "expected a value, found null"
    if spec.is_list and not isinstance(value, list):
        return f"expected a list of {spec.item_type}, found {shown(value)}"
    if spec.nullable and isinstance(value, str) and value in NULL_LOOKALIKES:
        return f"{value!r} is the string {value!r} here; write null (or ~) for no value"
    for item in value if spec.is_list else [value]:
        problem = _check_type(spec.item_type, item) or _check_item(spec, item)
        if problem:
            return (
                f"each item {problem}"
                if spec.is_list and not problem.startswith("expected")
                else problem
            )
    if check_choices and spec.choices is not None and value not in spec.choices:
        return f"must be one of {', '.join(map(repr, spec.choices))}, found {shown(value)}"
    return None


NULL_LOOKALIKES = ("None", "none", "NONE", "nil", "Nil")
"""Strings that look like "no value" in other languages; YAML's null is `null` or `~`."""

_SEXAGESIMAL = re.compile(r"[-+]?[0-9]+(:[0-5]?[0-9])+(\.[0-9]*)?")


def _check_item(spec: FieldSpec, item: Any) -> str | None:
    if spec.min is not None and item < spec.min:
        return f"must be >= {spec.min}, found {shown(item)}"
    if spec.max is not None and item > spec.max:
        return f"must be <= {spec.max}, found {shown(item)}"
    if spec.gt is not None and not item > spec.gt:
        return f"must be > {spec.gt}, found {shown(item)}"
    if (
        spec.pattern is not None
        and item not in dict(spec.sentinels)
        and not re.fullmatch(spec.pattern, item)
    ):
        return f"{shown(item)} does not match {spec.pattern_doc or spec.pattern}"
    return None


def shown(value: Any, limit: int = 80) -> str:
    """repr() of a value, cut short so a hostile input cannot flood an error message. Only the
    shown part is built: a value expanding to billions of items costs no more than a small one."""
    chunks: list[str] = []
    size = 0
    for chunk in _repr_chunks(value):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    text = "".join(chunks)
    return text if len(text) <= limit else text[: limit - 5] + " ...>"


def _repr_chunks(value: Any) -> Iterator[str]:
    """repr(value) in pieces, lazily (lists and dicts nested to any depth)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Text):
            yield item
        elif isinstance(item, dict):
            parts: list[Any] = [_Text("{")]
            for index, (key, inner) in enumerate(item.items()):
                parts += [_Text(", ")] if index else []
                parts += [key, _Text(": "), inner]
            stack.extend(reversed(parts + [_Text("}")]))
        elif isinstance(item, (list, tuple)):
            open_, close = (
                ("[", "]") if isinstance(item, list) else ("(", ",)" if len(item) == 1 else ")")
            )
            parts = [_Text(open_)]
            for index, inner in enumerate(item):
                parts += [_Text(", "), inner] if index else [inner]
                if index > 100:  # nobody reads further; the rest is elided
                    parts.append(_Text(", ..."))
                    break
            stack.extend(reversed(parts + [_Text(close)]))
        elif isinstance(item, str):
            yield repr(item[:200]) if len(item) > 200 else repr(item)
        else:
            yield repr(item)


class _Text(str):
    """A piece of repr() syntax (brackets, commas), not a value to repr."""


def _check_type(type_name: str, item: Any) -> str | None:
    if type_name == "bool" and not isinstance(item, bool):
        return f"expected a boolean, found {shown(item)}"
    if type_name in ("int", "float") and isinstance(item, str) and _SEXAGESIMAL.fullmatch(item):
        return (
            f"expected a number, found the string {item!r} (YAML 1.1 would read it as a base-60 "
            f"number; write the value as a plain number)"
        )
    if type_name == "int" and (isinstance(item, bool) or not isinstance(item, int)):
        return f"expected an integer, found {shown(item)}"
    if type_name == "float":
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            return f"expected a number, found {shown(item)}"
        if not math.isfinite(item):
            return f"expected a finite number, found {shown(item)}"
    if type_name == "str" and not isinstance(item, str):
        return f"expected a string, found {shown(item)}"
    return None
