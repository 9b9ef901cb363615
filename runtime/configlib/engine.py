"""The config engine: layered loading of YAML files and flags into a spec's dataclasses.

generated/parser.py builds one `ConfigSpec` from the spec's tables (fields, sections, aliases,
rules, derived defaults) and exposes its methods. Nothing here knows any particular field.

Sources apply in layers: spec defaults, then base files (`base:` in a file), then the file, then
command-line flags; later layers win. `${env:NAME}` references in values are read from the
environment as the layers are merged (environ.py). Every problem in every layer is collected and
raised together as one `ConfigError`, each naming the key path and the file and line (or flag) it
came from.

`ConfigSpec` holds the tables and hands each job to its module:

- layers.py: reading YAML files (and their bases), text and dicts into layers
- flags.py: command-line flags, splitting a command line, the --help parser
- environ.py: `${env:NAME}` references read with the field's type, and their provenance
- resolve.py: merging layers, old names, value checks, derived defaults, rules
- reconcile.py: a resolved config against a checkpoint, adopted values, a config built in code
- emit.py: dicts, the saved dict, YAML, nesting flat values, migrating old names
- values.py: key paths, coercing values, checking a dataclass built in code
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import emit, reconcile
from . import flags as cli
from .errors import Problems
from .fields import SECRET_PLACEHOLDER, BatchSchedule, Derived, FieldSpec, Rule, SectionSpec
from .layers import Layer, read_file_layers, read_text_layers
from .quantities import BatchRamp
from .resolve import Resolved, batch_ramp, resolve_dict, resolve_layers


class ConfigSpec:
    """A spec's tables plus the operations on configs: resolve, validate, migrate, reconcile."""

    def __init__(
        self,
        *,
        version: int,
        fields: Mapping[str, FieldSpec],
        sections: Mapping[str, SectionSpec],
        aliases: Mapping[str, str],
        alias_versions: Mapping[str, tuple[int, int | None]],
        rules: Sequence[Rule],
        derived: Mapping[str, Derived],
        batch_schedule: BatchSchedule | None = None,
    ) -> None:
        self.version = version
        self.fields = fields
        self.sections = sections
        self.aliases = aliases
        self.alias_versions = alias_versions
        self.rules = tuple(rules)
        self.derived = derived
        self.batch_schedule = batch_schedule
        """How token counts become steps (None: the spec has no steps fields)."""
        self.flags = cli.flag_paths(self)
        """Command-line flag (without --) -> canonical field path, old names included."""
        self.field_order = {path: index for index, path in enumerate(fields)}
        self.secret_paths = tuple(path for path, spec in fields.items() if spec.secret)
        """Fields whose value is never saved, shown or logged (SECRET_PLACEHOLDER instead)."""

    # ----- loading -----------------------------------------------------------------------------

    def resolve(
        self,
        path: str | os.PathLike | None = None,
        *,
        text: str | bytes | None = None,
        argv: Iterable[str] = (),
        filename: str | None = None,
    ) -> Resolved:
        """Resolve a config file (or YAML text) plus flags, with the source of every value."""
        problems = Problems()
        layers: list[Layer] = []
        if path is not None:
            layers += read_file_layers(self, os.fspath(path), problems, [], {})
        elif text is not None:
            layers += read_text_layers(self, text, filename or "<text>", problems, [], {})
        layers.append(cli.read_argv(self, argv, problems))
        # called here, not through a helper: an old name's warning points at this method's caller
        return resolve_layers(self, layers, problems)

    def load_config(
        self,
        path: str | os.PathLike | None = None,
        *,
        text: str | bytes | None = None,
        argv: Iterable[str] = (),
        filename: str | None = None,
    ) -> Any:
        """The root config of a YAML file (or text) and `--section.field VALUE` flags."""
        return self.resolve(path, text=text, argv=argv, filename=filename).config

    def config_from_dict(self, mapping: Mapping) -> Any:
        """Validate a plain nested dict (e.g. one saved in a checkpoint) into a config."""
        return resolve_dict(self, mapping).config

    def split_command_line(self, argv: Sequence[str]) -> tuple[list[str], list[str], bool]:
        """(positional arguments, config flags, whether help was asked for) of a command line
        whose flags may come before, between or after its positional arguments. A bool flag
        without a value (`--overwrite`) means true."""
        return cli.split_command_line(self, argv)

    def build_arg_parser(self, prog: str = "python -m runtime train") -> argparse.ArgumentParser:
        """An argparse parser with one --section.field flag per field, for --help text."""
        return cli.build_arg_parser(self, prog)

    def batch_ramp(self, config: Any) -> BatchRamp | None:
        """The batch-size schedule of a resolved config (global batch and tokens of every step);
        None when the spec declares no batch_schedule."""
        return batch_ramp(self, config)

    # ----- reconciling -------------------------------------------------------------------------

    def reconcile_with_checkpoint(
        self, resolved: Resolved, saved: Mapping, checkpoint: str = "checkpoint"
    ) -> tuple[Resolved, list[str]]:
        """The config of a resumed run, applying each field's checkpoint policy.

        `must_match` fields must equal the checkpoint's (an error names the field and both values);
        `from_checkpoint` fields take the checkpoint's value unless this run set them explicitly;
        `overridable` fields keep this run's value; secret fields, which the checkpoint does not
        hold, too. Returns (Resolved, notes about what changed).
        """
        return reconcile.reconcile_with_checkpoint(self, resolved, saved, checkpoint)

    def adopt_values(self, resolved: Resolved, values: Mapping[str, Any], origin: str) -> Resolved:
        """The config with `values` ({field path: value}) taken from `origin` (e.g. a Hugging Face
        config.json): a field this run left at its default takes the value; a field this run set
        explicitly to something else is an error naming both."""
        return reconcile.adopt_values(self, resolved, values, origin)

    def resolved_from_config(self, config: Any) -> Resolved:
        """A Resolved for a config built in code: values that differ from the spec default count
        as set explicitly (source `<config object>`); derived defaults left null are computed."""
        return reconcile.resolved_from_config(self, config)

    # ----- writing out -------------------------------------------------------------------------

    def config_to_dict(self, config: Any) -> dict:
        """A plain nested dict of a config, canonical names, spec order."""
        return emit.config_to_dict(config)

    def to_saved_dict(self, config: Any) -> dict:
        """The dict to store with a checkpoint: the config plus the spec version it was written
        for; secret fields hold SECRET_PLACEHOLDER."""
        return emit.to_saved_dict(self, config)

    def shown_value(self, path: str, value: Any) -> Any:
        """A field's value as shown to the user: SECRET_PLACEHOLDER for a secret one (unless
        null), the value otherwise."""
        if value is not None and path in self.secret_paths:
            return SECRET_PLACEHOLDER
        return value

    def flat_values(self, config: Any) -> dict[str, Any]:
        """{dotted field path: value} of a config, in spec order."""
        return emit.flat_values(self, config)

    def dump_yaml(self, config: Any) -> str:
        """Canonical YAML of a resolved config; loading it gives an equal config (secret fields
        aside: SECRET_PLACEHOLDER). Values read from the environment get a comment naming it."""
        return emit.dump_yaml(self, config)

    def nest(self, values: Mapping[str, Any]) -> dict:
        """A nested dict, sections in spec order, of {dotted field path: value}."""
        return emit.nest(self, values)

    def migrate_text(self, text: str | bytes, filename: str = "<text>") -> str:
        """The same config with every old name rewritten to its canonical key; values unchanged."""
        return emit.migrate_text(self, text, filename)
