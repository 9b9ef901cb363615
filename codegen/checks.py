"""Field descriptions and the single value check shared by the generator and the generated code.

Copied verbatim into generated/ by `make generate`, so the spec validation (defaults, choices) and
the config parser (user values) apply exactly the same rules.
"""

import math
from dataclasses import dataclass


@dataclass(kw_only=True)
class FieldSpec:
    """One config field as the spec declares it."""

    path: str  # dotted from the root, e.g. "system.device.dtype"
    name: str
    type: str  # int | float | bool | str | list[int] | list[float] | list[str]
    nullable: bool
    default: object
    doc: str
    aliases: tuple = ()  # full dotted paths of the old names
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    policy: str = "overridable"  # on resume: must_match | from_checkpoint | overridable

    @property
    def is_list(self):
        return self.type.startswith("list[")

    @property
    def item_type(self):
        return self.type[5:-1] if self.is_list else self.type

    @property
    def type_text(self):
        return self.type + ("?" if self.nullable else "")


def check_value(spec, value, check_choices=True):
    """Why `value` does not fit the field's type and constraints, or None if it does."""
    if value is None:
        return None if spec.nullable else "expected a value, found null"
    if spec.is_list and not isinstance(value, list):
        return f"expected a list of {spec.item_type}, found {shown(value)}"
    for item in value if spec.is_list else [value]:
        problem = _check_type(spec.item_type, item)
        if problem:
            return problem
    if spec.min is not None and value < spec.min:
        return f"must be >= {spec.min}, found {shown(value)}"
    if spec.max is not None and value > spec.max:
        return f"must be <= {spec.max}, found {shown(value)}"
    if spec.gt is not None and not value > spec.gt:
        return f"must be > {spec.gt}, found {shown(value)}"
    if check_choices and spec.choices is not None and value not in spec.choices:
        return f"must be one of {', '.join(map(repr, spec.choices))}, found {shown(value)}"
    return None


def shown(value, limit=80):
    """repr() of a value, cut short so a hostile input cannot flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...>"


def _check_type(type_name, item):
    if type_name == "bool" and not isinstance(item, bool):
        return f"expected a boolean, found {shown(item)}"
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
