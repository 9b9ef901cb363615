"""Resolving layers into a config: merge them over the spec defaults (later layers win), apply old
names (warning, or refusing names removed from the spec), check every value, compute derived
defaults left null, build the dataclasses and check the cross-field rules.

Every problem is collected; one `ConfigError` raises them all at the end.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .environ import expand_layers, remember_sources
from .errors import DEFAULT_SOURCE, ConfigAliasWarning, ConfigError, Problem, Problems, Source
from .fields import (
    SECRET_PLACEHOLDER,
    FieldSpec,
    RecordProblem,
    check_value,
    record_problems,
    shown,
)
from .layers import Assignment, Layer, dict_layer
from .quantities import STEPS_TYPE, BatchRamp, Quantity
from .values import build_records, coerce, get_path, join_path, record_items
from .yamllines import LineDict, LineList

if TYPE_CHECKING:
    from .engine import ConfigSpec


@dataclass
class Resolved:
    """A resolved config and where each value came from."""

    config: Any
    sources: dict[str, Source]  # field path -> Source of the winning value
    overridden: dict[str, list[tuple[Any, Source]]]  # field path -> values that lost, oldest first
    warnings: list[str] = field(default_factory=list)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind: 1e-3 == 0.001, but true != 1."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    return type(a) is type(b) and a == b


def _normal(field_spec: FieldSpec, value: Any) -> Any:
    """A value coerced to its field's type; the items of a valid list[record] value completed
    with their defaults, so that `{path: a}` and `{path: a, weight: 1.0}` compare equal."""
    value = coerce(field_spec, value)
    if field_spec.record is not None and check_value(field_spec, value) is None:
        return record_items(field_spec, value)
    return value


def resolve_layers(spec: ConfigSpec, layers: list[Layer], problems: Problems) -> Resolved:
    """The config of layers applied in order over the spec defaults, every value checked.

    An old name warns with stacklevel 5, which reaches the caller of `ConfigSpec.resolve` (it calls
    this function, which calls `_merge`, which calls `_apply_renames`): keep that chain."""
    notes: list[str] = []
    layers, unreadable = expand_layers(spec, layers, problems)  # `${env:...}` references
    values, sources, overridden = _merge(spec, layers, problems, notes)
    bad = _check_values(spec, values, sources, problems, unreadable)
    for path in bad:
        values[path] = spec.fields[
            path
        ].default  # keep building so rules over other fields still run
    resolve_quantities(spec, values, sources, bad, problems)
    fill_derived(spec, values, sources, bad, problems)
    config = build(spec, "", values)
    check_rules(spec, config, bad, sources, problems)
    if problems:
        raise ConfigError(problems)
    remember_sources(config, sources)
    return Resolved(config, sources, overridden, notes)


def resolve_dict(spec: ConfigSpec, mapping: Mapping) -> Resolved:
    """The config of a plain nested dict (e.g. one saved in a checkpoint)."""
    problems = Problems()
    layer = dict_layer(spec, mapping, problems)
    return resolve_layers(spec, [layer], problems)


def _merge(
    spec: ConfigSpec, layers: list[Layer], problems: Problems, notes: list[str]
) -> tuple[dict[str, Any], dict[str, Source], dict[str, list]]:
    """Apply layers in order; later flags win. Within one file the same field may be given
    twice (under its name and an old name) only with the same value, and each is checked."""
    values = {path: field_spec.default for path, field_spec in spec.fields.items()}
    sources = {path: DEFAULT_SOURCE for path in spec.fields}
    overridden: dict[str, list] = {}
    for layer in layers:
        _apply_renames(spec, layer, problems, notes)
        seen: dict[str, Assignment] = {}
        for item in layer.assignments:
            if item.path in seen and item.source.kind != "cli":
                _check_repeat(spec, seen[item.path], item, problems)
                continue
            seen[item.path] = item
            overridden.setdefault(item.path, []).append((values[item.path], sources[item.path]))
            values[item.path] = item.value
            sources[item.path] = item.source
    return values, sources, overridden


def _check_repeat(
    spec: ConfigSpec, first: Assignment, again: Assignment, problems: Problems
) -> None:
    """A field given a second time in one file: its value is checked as if it came first
    (so the order of a canonical key and its old name does not matter), then compared."""
    field_spec = spec.fields[again.path]
    value = _normal(field_spec, again.value)
    problem = check_value(field_spec, _plain(value))
    if problem:
        problem = _told(field_spec, problem, again.source, again.value)
        problems.append(
            Problem(again.path, f"{problem} (given as {again.written!r})", again.source, "value")
        )
    elif check_value(field_spec, _plain(coerce(field_spec, first.value))) is None and not _same(
        _normal(field_spec, first.value), value
    ):  # 1e-3 and 0.001 agree; true and 1 do not (a bad first value is reported on its own)
        first_shown, again_shown = shown(first.value), shown(again.value)
        if field_spec.secret:
            first_shown = again_shown = SECRET_PLACEHOLDER
        message = (
            f"given twice with different values: {first.written!r} = {first_shown} "
            f"({first.source}) and {again.written!r} = {again_shown}"
        )
        problems.append(Problem(again.path, message, again.source, "duplicate"))


def _apply_renames(spec: ConfigSpec, layer: Layer, problems: Problems, notes: list[str]) -> None:
    for rename in layer.renames:
        since, removed = spec.alias_versions[rename.written]
        if removed is not None and removed <= spec.version:
            if layer.spec_version is None or layer.spec_version >= removed:
                message = (
                    f"{rename.written!r} was renamed to {rename.canonical!r} in spec version {since} and removed in "
                    f"version {removed}; run `python -m runtime config migrate FILE` to rewrite it"
                )
                problems.append(Problem(rename.written, message, rename.source, "key"))
                continue
            notes.append(
                f"{rename.source}: upgraded {rename.written!r} to {rename.canonical!r} (written for spec version {layer.spec_version})"
            )
            continue
        note = f"{rename.source}: {rename.written!r} is an old name of {rename.canonical!r}; it still works, but write {rename.canonical!r}"
        notes.append(note)
        warnings.warn(note, ConfigAliasWarning, stacklevel=5)  # see resolve_layers


def _told(field_spec: FieldSpec, problem: str, source: Source, value: Any) -> str:
    """A value's problem as told to the user: with the environment variables the value was read
    from, and without the value of a secret field."""
    if field_spec.secret and value is not None:  # messages show values as shown() writes them
        problem = problem.replace(shown(value), SECRET_PLACEHOLDER)
    if not source.env:
        return problem
    variables = "variables" if len(source.env) > 1 else "variable"
    return f"{problem} (read from environment {variables} {source.env_text.removeprefix('environment ')})"


def _check_values(
    spec: ConfigSpec, values: dict, sources: dict, problems: Problems, unreadable: set[str]
) -> set[str]:
    """Check (and coerce) every value; the bad fields. `unreadable`: fields whose environment
    reference could not be read (already reported), bad without a check."""
    bad = set(unreadable)
    for path, field_spec in spec.fields.items():
        if path in unreadable:
            continue
        if field_spec.record is not None:
            found = record_problems(field_spec, values[path])
            for item in found:
                source = _item_source(sources[path], values[path], item)
                message = _told(field_spec, item.message, source, None)
                problems.append(Problem(item.path(path), message, source, item.kind))
            if found:
                bad.add(path)
            else:
                values[path] = record_items(field_spec, values[path])
            continue
        value = coerce(field_spec, values[path])
        if isinstance(value, list):
            value = list(value)  # drop the line-tracking list type
        values[path] = value
        problem = check_value(field_spec, value)
        if problem:
            problem = _told(field_spec, problem, sources[path], value)
            problems.append(Problem(path, problem, sources[path], "value"))
            bad.add(path)
    return bad


def _item_source(source: Source, value: Any, problem: RecordProblem) -> Source:
    """Where a problem of a list[record] value was written: the line of the item's key, or of the
    item, when the value came from a file (a flag or a dict has no lines of its own)."""
    if source.kind != "file" or not isinstance(value, LineList) or problem.index is None:
        return source
    if problem.index >= len(value.item_lines):
        return source
    line = value.item_lines[problem.index]
    item = value[problem.index]
    if problem.key is not None and isinstance(item, LineDict):
        line = item.key_lines.get(problem.key, line)
    return replace(source, line=line) if line else source


def build(spec: ConfigSpec, section_path: str, values: Mapping[str, Any]) -> Any:
    """The dataclass of a section (and its subsections) from {dotted field path: value}; the
    items of a list[record] field, plain mappings there, become the record's dataclasses."""
    section = spec.sections[section_path]
    kwargs: dict[str, Any] = {}
    for name in section.fields:
        field_spec = spec.fields[join_path(section_path, name)]
        value = values[field_spec.path]
        kwargs[name] = build_records(field_spec, value) if field_spec.record else value
    kwargs.update(
        {name: build(spec, join_path(section_path, name), values) for name in section.sections}
    )
    return section.cls(**kwargs)


def _quantity_slots(
    field_spec: FieldSpec, value: Any
) -> list[tuple[str, FieldSpec, Quantity, Any, Any]]:
    """The counts written with a unit in a checked value: (where in the value, the spec of that
    item, the Quantity, the container holding it, its key or index there)."""
    slots: list[tuple[str, FieldSpec, Quantity, Any, Any]] = []
    if field_spec.record is not None:
        for index, item in enumerate(value or []):
            for key_spec in field_spec.record.fields:
                inner = item.get(key_spec.name)
                if isinstance(inner, Quantity):
                    slots.append(
                        (f"[{index}].{key_spec.name}", key_spec, inner, item, key_spec.name)
                    )
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            if isinstance(inner, Quantity):
                slots.append((f"[{index}]", field_spec, inner, value, index))
    elif isinstance(value, Quantity):
        slots.append(("", field_spec, value, None, None))
    return slots


def batch_ramp(spec: ConfigSpec, config: Any) -> BatchRamp | None:
    """The batch-size schedule of a (resolved) config; None when the spec declares none."""
    if spec.batch_schedule is None:
        return None
    return BatchRamp(**spec.batch_schedule.compute(config))


def resolve_quantities(
    spec: ConfigSpec, values: dict, sources: dict, bad: set[str], problems: Problems
) -> None:
    """Turn every count written with a unit into its field's int: `N steps` and a tokens field's
    `N tokens` are N; a steps field's `N tokens` is the first step by which N tokens have been
    trained on, on the spec's batch schedule (which reads plain fields only). Each source keeps
    what was written and what it became (explain, dump_yaml)."""
    pending: list[tuple[str, tuple[str, FieldSpec, Quantity, Any, Any]]] = []
    for path, field_spec in spec.fields.items():
        if path in bad:
            continue
        for slot in _quantity_slots(field_spec, values[path]):
            location, item_spec, quantity, _, _ = slot
            if item_spec.item_type == STEPS_TYPE and quantity.unit != STEPS_TYPE:
                pending.append((path, slot))
                continue
            _put(values, path, slot, quantity.amount)
            exact = f"{quantity.amount:,} {quantity.unit}"
            note = f"{quantity.written} = {exact}" if quantity.written != exact else ""
            _remember(sources, path, location, quantity.written, note)
    if not pending:
        return
    schedule = spec.batch_schedule
    if schedule is None or any(p in bad for p in schedule.paths):
        for path, _ in pending:  # the ramp's own fields are reported already
            bad.add(path)
            values[path] = spec.fields[path].default
        return
    ramp = batch_ramp(spec, build(spec, "", values))
    assert ramp is not None
    notes: dict[str, list[str]] = {}
    for path, slot in pending:
        location, _, quantity, _, _ = slot
        step = ramp.step_at_tokens(quantity.amount)
        _put(values, path, slot, step)
        note = f"{quantity.written} = step {step:,} ({ramp.describe()})"
        notes.setdefault(path, []).append(note)
        _remember(sources, path, location, quantity.written, note)
    for path, resolved_here in notes.items():  # bounds hold for the steps
        field_spec = spec.fields[path]
        if field_spec.record is not None:
            found = [
                (item.path(path), item.message)
                for item in record_problems(field_spec, values[path])
            ]
        else:
            problem = check_value(field_spec, values[path])
            found = [(path, problem)] if problem else []
        for where, message in found:
            problems.append(
                Problem(where, f"{message} ({'; '.join(resolved_here)})", sources[path], "value")
            )
        if found:
            bad.add(path)
            values[path] = field_spec.default


def _put(values: dict, path: str, slot: tuple, value: int) -> None:
    _, _, _, container, key = slot
    if container is None:
        values[path] = value
    else:
        container[key] = value


def _remember(sources: dict, path: str, location: str, written: str, note: str) -> None:
    source = sources[path]
    sources[path] = replace(source, resolved=source.resolved + ((location, written, note),))


def fill_derived(
    spec: ConfigSpec, values: dict, sources: dict, bad: set[str], problems: Problems
) -> None:
    """Compute each derived default left null, from the fields it reads."""
    for path, derived in spec.derived.items():
        if values[path] is not None or path in bad:
            continue
        if any(p in bad for p in derived.paths):
            bad.add(path)
            continue
        value = coerce(spec.fields[path], derived.compute(build(spec, "", values)))
        source = Source("derived", expression=derived.expression)
        problem = check_value(spec.fields[path], value)
        if problem:
            problems.append(
                Problem(
                    path,
                    f"{problem} (its default is derived: {derived.expression})",
                    source,
                    "value",
                )
            )
            bad.add(path)
            continue
        values[path] = value
        sources[path] = source


def check_rules(
    spec: ConfigSpec,
    config: Any,
    bad: set[str],
    sources: Mapping[str, Source],
    problems: Problems,
) -> None:
    """Check each cross-field rule whose fields all passed their own checks."""
    for rule in spec.rules:
        if any(path in bad for path in rule.paths):
            continue
        if rule.applies is not None and not rule.applies(config):
            continue
        if rule.holds(config):
            continue
        given = [p for p in rule.paths if sources[p].explicit]
        blamed = given[-1] if given else rule.paths[0]
        detail = ", ".join(
            f"{p} = {SECRET_PLACEHOLDER if spec.fields[p].secret else repr(get_path(config, p))} "
            f"({sources[p].describe()})"
            for p in rule.paths
        )
        problems.append(
            Problem(
                blamed,
                f"{rule.message}: `{rule.check}` does not hold ({detail})",
                sources[blamed],
                "rule",
            )
        )
