"""Field paths and values outside the layered load.

Dotted key paths (join, parent, last key), reading a field from a config object (`get_path`),
bringing a YAML or JSON value to its field's Python type (`coerce`, defined in fields.py beside
the check it comes before), the items of a list[record] field as plain mappings (`record_items`,
defaults filled) and as the record's dataclasses (`build_records`), and checking a dataclass built
in code (`validate_instance` and `validate_record`, called from the generated __post_init__).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .fields import FieldSpec, SectionSpec, check_value, coerce, record_problems, shown


def join_path(prefix: str, name: str) -> str:
    """`prefix.name`, or `name` at the root."""
    return f"{prefix}.{name}" if prefix else name


def parent_path(path: str) -> str:
    """The section path holding a key path ("" for the root)."""
    return path.rsplit(".", 1)[0] if "." in path else ""


def last_key(path: str) -> str:
    """The last key of a dotted path."""
    return path.rsplit(".", 1)[-1]


def get_path(config: Any, path: str) -> Any:
    """The value at a dotted field path of a config object."""
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def record_items(spec: FieldSpec, value: Any) -> Any:
    """The canonical value of a valid list[record] value: a list of plain dicts holding every key
    of the record, in spec order, defaults filled and values coerced (None stays None)."""
    record = spec.record
    assert record is not None, spec.path
    if value is None:
        return None
    items = []
    for item in coerce(spec, value):
        items.append(
            {f.name: item[f.name] if f.name in item else _fresh(f.default) for f in record.fields}
        )
    return items


def _fresh(default: Any) -> Any:
    return list(default) if isinstance(default, list) else default


def build_records(spec: FieldSpec, value: Any) -> Any:
    """The record dataclasses of a list[record] value given as mappings (instances stay)."""
    record = spec.record
    assert record is not None and record.cls is not None, spec.path
    if value is None:
        return None
    cls = record.cls
    if all(isinstance(item, cls) for item in value):
        return list(value)
    return [cls(**item) for item in record_items(spec, value)]


def validate_instance(
    instance: Any,
    section: SectionSpec,
    fields: Mapping[str, FieldSpec],
    sections: Mapping[str, SectionSpec],
) -> None:
    """Check a dataclass built in code (called from its __post_init__); ValueError on bad values."""
    problems = []
    for name in section.fields:
        spec = fields[join_path(section.path, name)]
        value = getattr(instance, name)
        if spec.record is not None:
            problems += _record_list_problems(spec, value)
            continue
        problem = check_value(spec, value)
        if problem:
            problems.append(f"{spec.path}: {problem}")
    for name in section.sections:
        child = sections[join_path(section.path, name)]
        if not isinstance(getattr(instance, name), child.cls):
            problems.append(f"{child.path}: expected a {child.cls.__name__}")
    if problems:
        raise ValueError("; ".join(problems))


def _record_list_problems(spec: FieldSpec, value: Any) -> list[str]:
    """A list[record] field of a dataclass built in code holds instances of the record's class."""
    record = spec.record
    assert record is not None and record.cls is not None, spec.path
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, record.cls):
                return [f"{spec.path}[{index}]: expected a {record.name}, found {shown(item)}"]
    return [
        f"{problem.path(spec.path)}: {problem.message}" for problem in record_problems(spec, value)
    ]


def validate_record(instance: Any, spec: FieldSpec) -> None:
    """Check a record built in code (called from its __post_init__); ValueError on bad values,
    naming the keys as `data.sources[].weight` (the record does not know its index)."""
    record = spec.record
    assert record is not None, spec.path
    problems = []
    for field_spec in record.fields:
        problem = check_value(field_spec, getattr(instance, field_spec.name))
        if problem:
            problems.append(f"{field_spec.path}: {problem}")
    if problems:
        raise ValueError("; ".join(problems))
