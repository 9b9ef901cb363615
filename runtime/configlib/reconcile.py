"""Reconciling a resolved config with values from elsewhere: the config saved in a checkpoint
(each field's resume policy), values adopted from another file (e.g. a Hugging Face config.json),
and a config object built in code. Each result is rebuilt from flat values, so derived defaults and
rules are checked again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .emit import flat_values
from .environ import env_sources, remember_sources
from .errors import DEFAULT_SOURCE, ConfigError, Problem, Problems, Source
from .fields import check_value, shown
from .resolve import Resolved, build, check_rules, fill_derived, resolve_dict
from .values import coerce

if TYPE_CHECKING:
    from .engine import ConfigSpec


def _finish(
    spec: ConfigSpec, values: dict, sources: dict, resolved: Resolved, notes: list[str]
) -> Resolved:
    """Rebuild a config from flat values, checking derived defaults and rules again."""
    problems = Problems()
    fill_derived(spec, values, sources, set(), problems)
    if problems:
        raise ConfigError(problems)
    config = build(spec, "", values)
    check_rules(spec, config, set(), sources, problems)
    if problems:
        raise ConfigError(problems)
    remember_sources(config, sources)
    return Resolved(config, sources, resolved.overridden, resolved.warnings + notes)


def reconcile_with_checkpoint(
    spec: ConfigSpec, resolved: Resolved, saved: Mapping, checkpoint: str
) -> tuple[Resolved, list[str]]:
    """The config of a resumed run and notes about what changed (see
    `ConfigSpec.reconcile_with_checkpoint` for the policies)."""
    saved_values = flat_values(spec, resolve_dict(spec, saved).config)
    values = flat_values(spec, resolved.config)
    sources = dict(resolved.sources)
    problems, notes = Problems(), []
    for path, field_spec in spec.fields.items():
        new, old = values[path], saved_values[path]
        if new == old or field_spec.secret:  # a secret is never saved: this run's own value
            continue
        if field_spec.policy == "must_match":
            problems.append(
                Problem(
                    path,
                    f"must match the checkpoint {checkpoint}: it has {old!r}, this run has {new!r}",
                    sources[path],
                    "value",
                )
            )
        elif field_spec.policy == "from_checkpoint" and not sources[path].explicit:
            values[path] = old
            sources[path] = Source("file", checkpoint, 0)
            notes.append(f"{path} = {old!r} taken from the checkpoint (spec default {new!r})")
        else:
            notes.append(
                f"{path}: this run's {new!r} overrides the checkpoint's {old!r} ({sources[path]})"
            )
    if problems:
        raise ConfigError(problems)
    return _finish(spec, values, sources, resolved, notes), notes


def adopt_values(
    spec: ConfigSpec, resolved: Resolved, values: Mapping[str, Any], origin: str
) -> Resolved:
    """The config with `values` taken from `origin` where this run left the field at its
    default (see `ConfigSpec.adopt_values`)."""
    current = flat_values(spec, resolved.config)
    sources = dict(resolved.sources)
    problems = Problems()
    for path, value in values.items():
        value = coerce(spec.fields[path], value)
        if value == current[path]:
            continue
        if sources[path].explicit:
            problems.append(
                Problem(
                    path,
                    f"this run sets {shown(current[path])} but {origin} has {shown(value)}; remove the key or make them agree",
                    sources[path],
                    "value",
                )
            )
            continue
        current[path] = value
        sources[path] = Source("file", origin, 0)
    for path, value in current.items():
        problem = check_value(spec.fields[path], value)
        if problem:
            problems.append(Problem(path, f"{problem} (from {origin})", sources[path], "value"))
    if problems:
        raise ConfigError(problems)
    return _finish(spec, current, sources, resolved, [])


def resolved_from_config(spec: ConfigSpec, config: Any) -> Resolved:
    """A Resolved for a config built in code: values that differ from the spec default count
    as set explicitly (source `<config object>`), values a resolved config read from the
    environment keep that source; derived defaults left null are computed."""
    values = flat_values(spec, config)
    sources = {
        path: DEFAULT_SOURCE
        if value == spec.fields[path].default
        else Source("file", "<config object>", 0)
        for path, value in values.items()
    }
    sources.update(env_sources(config))  # a config resolved here: what it read from the environment
    return _finish(spec, values, sources, Resolved(config, sources, {}, []), [])
