"""What the spec says about each field, section and rule, and the one value check (with the
coercion of YAML and JSON spellings that comes before it).

The generator reads the spec into these objects to validate defaults and choices; the generated
tables (generated/config.py, generated/parser.py) are built from them, so the spec's defaults and
the user's values pass exactly the same check.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .quantities import QUANTITY_TYPES, STEPS_TYPE, SYNTAX, TOKENS_SYNTAX, Quantity, parse_quantity

RECORD_LIST = "list[record]"
"""The type of a field whose value is a list of records (mappings with the record's fields)."""

ENV_START = "${env:"
"""How an environment reference starts (`${env:NAME}`, `${env:NAME,default}`); a value holding it
is read from the environment when loaded (environ.py)."""

SECRET_PLACEHOLDER = "<secret>"
"""What saved configs, `config show` and logs write for the value of a secret field; given as
the value of a secret field, it counts as not given."""


@dataclass(kw_only=True)
class FieldSpec:
    """One config field as the spec declares it."""

    path: str  # dotted from the root, e.g. "system.device.dtype"
    name: str
    type: str  # int | float | bool | str | steps | tokens | list[...] of those | list[record]
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
    record: RecordSpec | None = None  # the item type of a list[record] field
    required: bool = False  # a record's field without a default: every item must give it
    secret: bool = False  # never saved, shown or logged: SECRET_PLACEHOLDER stands for it

    @property
    def is_list(self) -> bool:
        return self.type.startswith("list[")

    @property
    def item_type(self) -> str:
        return self.type[5:-1] if self.is_list else self.type

    @property
    def type_text(self) -> str:
        shown_type = f"list[{self.record.name}]" if self.record is not None else self.type
        return shown_type + ("?" if self.nullable else "")


@dataclass(kw_only=True, frozen=True)
class RecordSpec:
    """The items of a `list[record]` field: mappings of the record's fields, built into the
    record's dataclass. Its fields' paths are the list's path plus `[].name`
    (`data.sources[].weight`); `item_path` puts an index in (`data.sources[2].weight`)."""

    name: str  # the generated dataclass's name, e.g. "DataSource"
    cls: type | None  # that dataclass (None while the generator reads the spec)
    fields: tuple[FieldSpec, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


def item_path(path: str, index: int | None = None, key: str | None = None) -> str:
    """The path of an item of a list[record] field, or of one of its keys: `item_path(
    "data.sources", 1, "weight")` and `item_path("data.sources[].weight", 1)` are both
    `data.sources[1].weight`."""
    if "[]" in path:
        path = path.replace("[]", f"[{index}]" if index is not None else "[]", 1)
    elif index is not None:
        path = f"{path}[{index}]"
    return f"{path}.{key}" if key is not None else path


@dataclass(frozen=True)
class RecordProblem:
    """One thing wrong with a list[record] value: the item (None: the list itself) and key
    (None: the whole item) it is about, and its problem kind ("value" or "key")."""

    index: int | None
    key: str | None
    message: str
    kind: str = "value"

    def path(self, list_path: str) -> str:
        return item_path(list_path, self.index, self.key)


def record_problems(spec: FieldSpec, value: Any) -> list[RecordProblem]:
    """Every problem of a list[record] value: not a list, items that are not mappings (or
    instances of the record's class), unknown keys, missing required keys, and each key's value
    checked like any field's. Values are coerced before their check, as when loading."""
    record = spec.record
    assert record is not None, spec.path
    keys = ", ".join(record.keys)
    if value is None:
        if spec.nullable:
            return []
        return [RecordProblem(None, None, f"expected a list of {record.name} items, found null")]
    if not isinstance(value, list):
        message = f"expected a list of {record.name} items (mappings with keys {keys}), found {shown(value)}"
        return [RecordProblem(None, None, message)]
    problems: list[RecordProblem] = []
    known = {f.name: f for f in record.fields}
    for index, item in enumerate(value):
        if record.cls is not None and isinstance(item, record.cls):
            mapping: Mapping = {name: getattr(item, name) for name in known}
        elif isinstance(item, Mapping):
            mapping = item
        else:
            message = (
                f"expected a {record.name} item, a mapping with keys {keys}; found {shown(item)}"
            )
            problems.append(RecordProblem(index, None, message))
            continue
        for key in mapping:
            if key not in known:
                written = key if isinstance(key, str) and len(key) <= 64 else shown(key, 40)
                problems.append(RecordProblem(index, written, _unknown_key(key, record), "key"))
        for name, field_spec in known.items():
            if name not in mapping:
                if field_spec.required:
                    message = f"missing required key {name!r} (each {record.name} item needs it)"
                    problems.append(RecordProblem(index, None, message, "key"))
                continue
            written = mapping[name]
            coerced = coerce(field_spec, written)
            problem = check_value(field_spec, coerced)
            if problem and _int_as_float(written, coerced):  # show -1 as written, not -1.0
                problem = check_value(field_spec, written) or problem
            if problem:
                problems.append(RecordProblem(index, name, problem))
    return problems


def _int_as_float(written: Any, coerced: Any) -> bool:
    """An int given for a float key, which becomes a finite float (so also checks as written)."""
    return (
        isinstance(written, int)
        and not isinstance(written, bool)
        and isinstance(coerced, float)
        and math.isfinite(coerced)
    )


def _unknown_key(key: Any, record: RecordSpec) -> str:
    keys = ", ".join(record.keys)
    if not isinstance(key, str) or len(key) > 64:
        return f"unknown key {shown(key, 40)} in a {record.name} item; expected one of {keys}"
    import difflib  # only on errors

    close = difflib.get_close_matches(key, list(record.keys), n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r} in a {record.name} item; did you mean {close[0]!r}?"
    return f"unknown key {key!r} in a {record.name} item; expected one of {keys}"


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
class BatchSchedule:
    """The spec's `batch_schedule`: BatchRamp's arguments computed from a config, so that token
    counts of `steps` fields resolve to steps (quantities.py)."""

    expressions: Mapping[str, str]  # BatchRamp argument -> the spec's expression
    paths: tuple[str, ...]  # the fields they read
    compute: Callable[[Any], dict[str, Any]]  # Config -> BatchRamp keyword arguments


@dataclass(frozen=True)
class Derived:
    """A field whose null means "computed from other fields" (a derived default)."""

    expression: str  # the spec's expression, shown as the value's source
    paths: tuple[str, ...]  # the fields it reads
    compute: Callable[[Any], Any]  # Config -> value


def check_value(spec: FieldSpec, value: Any, check_choices: bool = True) -> str | None:
    """Why `value` does not fit the field's type and constraints, or None if it does. Bounds and
    patterns of a list field apply to each item; a list[record] value reports its first problem
    (`record_problems` gives them all)."""
    if spec.record is not None:
        found = record_problems(spec, value)
        if not found:
            return None
        first = found[0]
        where = first.path("")
        return f"{where}: {first.message}" if where else first.message
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
    if isinstance(item, Quantity):  # the bounds hold for its count in the field's own unit
        if item.unit != spec.item_type:
            return None  # tokens of a steps field: checked once resolved to a step
        item = item.amount
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
    if type_name in QUANTITY_TYPES:
        return _check_quantity(type_name, item)
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


def _check_quantity(type_name: str, item: Any) -> str | None:
    """A steps or tokens value: an integer, a Quantity (a count with its unit, coerced from its
    string), or a string that does not spell one (the message says why)."""
    if isinstance(item, Quantity):
        if type_name == STEPS_TYPE or item.unit == type_name:
            return None
        return f"expected {TOKENS_SYNTAX}, found {item.written!r} (this field counts tokens)"
    if isinstance(item, str) and _SEXAGESIMAL.fullmatch(item):
        return _check_type("int", item)  # the base-60 message
    if isinstance(item, str):
        parsed = parse_quantity(item, type_name)
        return parsed if isinstance(parsed, str) else None
    if isinstance(item, bool) or not isinstance(item, int):
        return (
            f"expected {SYNTAX if type_name == STEPS_TYPE else TOKENS_SYNTAX}, found {shown(item)}"
        )
    return None


def coerce(spec: FieldSpec, value: Any) -> Any:
    """The value in the field's Python type where YAML or JSON spell it another way: an int for a
    float field, an integral float (4.0) for an int field. Anything else is left for the check.
    The items of a list[record] field become plain dicts of their keys as given, each value
    coerced (an instance of the record's class gives its fields)."""
    if spec.record is not None:
        if not isinstance(value, list):
            return plain_data(value)
        return [_coerce_record_item(spec.record, item) for item in value]
    if isinstance(value, list):
        return [_coerce_item(spec.item_type, item) for item in value]
    if not spec.is_list:
        return _coerce_item(spec.type, value)
    return value


def _coerce_record_item(record: RecordSpec, item: Any) -> Any:
    if record.cls is not None and isinstance(item, record.cls):
        return {f.name: coerce(f, getattr(item, f.name)) for f in record.fields}
    if not isinstance(item, Mapping):
        return plain_data(item)
    known = {f.name: f for f in record.fields}
    return {
        key: coerce(known[key], value) if key in known else plain_data(value)
        for key, value in item.items()
    }


def plain_data(value: Any) -> Any:
    """The value with the line-tracking dicts and lists of the YAML loader made plain."""
    if isinstance(value, Mapping):
        return {key: plain_data(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [plain_data(inner) for inner in value]
    return value


def _coerce_item(type_name: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and type(value) is not str:
        return str.__str__(value)  # a generated constant (StrEnum) is stored as its plain value
    if type_name in QUANTITY_TYPES and isinstance(value, str):
        parsed = parse_quantity(value, type_name)
        return parsed if isinstance(parsed, Quantity) else value  # a bad one stays for the check
    if type_name in QUANTITY_TYPES and isinstance(value, float) and value.is_integer():
        return int(value)
    if type_name == "float" and isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf  # rejected as non-finite by the check
    if type_name == "int" and isinstance(value, float) and value.is_integer():
        return int(value)  # JSON and JSON Schema do not tell 4.0 from 4
    return value
