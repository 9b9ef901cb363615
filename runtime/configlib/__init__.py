"""The config engine that generated/ calls into: YAML with line numbers, value checks, layered
loading with provenance, migrate and reconcile. It knows no particular field; the spec's tables
come from generated/ (see codegen/generate.py). Imports no torch.

Generated code records the ENGINE_VERSION it was made for and calls `require_engine` on import,
so a generated/ folder from another version of this package fails at once with the fix.
"""

from .engine import ConfigSpec
from .environ import SCHEMA_PATTERN as ENV_SCHEMA_PATTERN
from .environ import SCHEMA_TRIGGER as ENV_SCHEMA_TRIGGER
from .environ import env_sources
from .errors import MAX_SHOWN_PROBLEMS, ConfigAliasWarning, ConfigError, Problem, Problems, Source
from .fields import (
    ENV_START,
    RECORD_LIST,
    SECRET_PLACEHOLDER,
    BatchSchedule,
    Derived,
    FieldSpec,
    RecordProblem,
    RecordSpec,
    Rule,
    SectionSpec,
    check_value,
    item_path,
    record_problems,
    shown,
)
from .layers import BASE_KEY, RESERVED_KEYS, VERSION_KEY
from .resolve import Resolved
from .values import coerce, get_path, validate_instance, validate_record
from .yamllines import LineDict, LineList, YAMLLoadError, load_yaml

ENGINE_VERSION = 4
"""Bump when the tables generated/ passes in change shape; the generator writes the new number.
2: list[record] fields (FieldSpec.record, FieldSpec.required, RecordSpec, validate_record).
3: secret fields (FieldSpec.secret); `${env:NAME}` references.
4: steps and tokens fields (counts with a unit), ConfigSpec's batch_schedule (BatchSchedule)."""


class EngineMismatch(ImportError):
    """generated/ was made for a different version of this engine."""


def require_engine(version: int) -> None:
    """Refuse generated code made for another engine version (call it from generated/)."""
    if version != ENGINE_VERSION:
        raise EngineMismatch(
            f"generated/ was made for config engine version {version}, but runtime/configlib is version "
            f"{ENGINE_VERSION}; run `make generate` to regenerate it"
        )


__all__ = [
    "BASE_KEY",
    "ENGINE_VERSION",
    "ENV_SCHEMA_PATTERN",
    "ENV_SCHEMA_TRIGGER",
    "ENV_START",
    "RESERVED_KEYS",
    "SECRET_PLACEHOLDER",
    "VERSION_KEY",
    "ConfigAliasWarning",
    "ConfigError",
    "ConfigSpec",
    "BatchSchedule",
    "Derived",
    "EngineMismatch",
    "FieldSpec",
    "LineDict",
    "LineList",
    "MAX_SHOWN_PROBLEMS",
    "Problem",
    "Problems",
    "RECORD_LIST",
    "RecordProblem",
    "RecordSpec",
    "Resolved",
    "Rule",
    "SectionSpec",
    "Source",
    "YAMLLoadError",
    "check_value",
    "coerce",
    "env_sources",
    "get_path",
    "item_path",
    "load_yaml",
    "record_problems",
    "require_engine",
    "shown",
    "validate_instance",
    "validate_record",
]
