"""Field paths and values outside the layered load.

Dotted key paths (join, parent, last key), reading a field from a config object (`get_path`),
bringing a YAML or JSON value to its field's Python type (`coerce`), and checking a dataclass
built in code (`validate_instance`, called from the generated __post_init__).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .fields import FieldSpec, SectionSpec, check_value


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


def coerce(spec: FieldSpec, value: Any) -> Any:
    """The value in the field's Python type where YAML or JSON spell it another way: an int for a
    float field, an integral float (4.0) for an int field. Anything else is left for the check."""
    if isinstance(value, list):
        return [_coerce_item(spec.item_type, item) for item in value]
    if not spec.is_list:
        return _coerce_item(spec.type, value)
    return value


def _coerce_item(type_name: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and type(value) is not str:
        return str.__str__(value)  # a generated constant (StrEnum) is stored as its plain value
    if type_name == "float" and isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf  # rejected as non-finite by the check
    if type_name == "int" and isinstance(value, float) and value.is_integer():
        return int(value)  # JSON and JSON Schema do not tell 4.0 from 4
    return value


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
        problem = check_value(spec, getattr(instance, name))
        if problem:
            problems.append(f"{spec.path}: {problem}")
    for name in section.sections:
        child = sections[join_path(section.path, name)]
        if not isinstance(getattr(instance, name), child.cls):
            problems.append(f"{child.path}: expected a {child.cls.__name__}")
    if problems:
        raise ValueError("; ".join(problems))
