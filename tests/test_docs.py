"""The generated Markdown reference lists exactly the spec's fields, and the generated JSON Schema
accepts every example config (as written and in canonical form) and rejects broken ones.

jsonschema is not a dependency; `validate` below implements the keywords the generator emits.
"""

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from generated import ALIASES, FIELDS, RULES, SECTIONS, config_to_dict, dump_yaml, load_config
from generated.parser import migrate_text

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = (REPO / "generated" / "CONFIG.md").read_text()
SCHEMA = json.loads((REPO / "generated" / "config.schema.json").read_text())
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
CONFIG_IDS = [p.name for p in CONFIGS]
DOTTED = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)+$")


def cells(row):
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def field_rows():
    """(section heading, {column name: cell}) for every row of every field table."""
    rows, heading, columns = [], None, None
    for line in MARKDOWN.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("| Key |"):
            columns = cells(line)
        elif line.startswith("| `") and heading != "Rules":
            row = cells(line)
            assert len(row) == len(columns), line
            rows.append((heading, dict(zip(columns, row))))
    return rows


def ticked(text):
    return re.findall(r"`([^`]+)`", text)


# --- Markdown -------------------------------------------------------------------------------------


def test_markdown_lists_exactly_the_fields():
    keys = [ticked(row["Key"])[0] for _, row in field_rows()]
    assert len(keys) == len(set(keys)), "a field is listed twice"
    assert set(keys) == set(FIELDS)


def test_markdown_rows_are_under_their_section_with_type_default_and_aliases():
    for heading, row in field_rows():
        key, type_text, default = row["Key"], row["Type"], row["Default"]
        constraints, old_names, description = (
            row["Constraints"],
            row["Old names"],
            row["Description"],
        )
        path = ticked(key)[0]
        spec = FIELDS[path]
        section = path.rsplit(".", 1)[0] if "." in path else ""
        assert heading == (section or "root"), path
        assert ticked(type_text) == [spec.type_text], path
        shown = yaml.safe_load(ticked(default)[0])
        if spec.type == "float" and isinstance(shown, str):
            shown = float(shown)
        assert shown == spec.default, f"{path}: default shown as {default}"
        assert set(ticked(old_names)) == set(spec.aliases), path
        if "Policy" in row:
            assert row["Policy"] == spec.policy, path
        assert " ".join(spec.doc.split()) == description.replace("\\|", "|"), path
        if spec.choices:
            assert all(f"`{c}`" in constraints for c in spec.choices), path


def test_markdown_has_every_section_and_section_alias():
    headings = {line[3:].strip() for line in MARKDOWN.splitlines() if line.startswith("## ")}
    for path, section in SECTIONS.items():
        assert (path or "root") in headings
        assert section.cls.__name__ in MARKDOWN
    for old, new in ALIASES.items():
        if new in SECTIONS:
            body = MARKDOWN.split(f"\n## {new}\n", 1)[1].split("\n## ", 1)[0]
            assert f"`{old}`" in body, f"section alias {old} not documented under {new}"


def test_every_alias_appears():
    for old in ALIASES:
        assert f"`{old}`" in MARKDOWN, old


def test_no_dotted_name_in_the_markdown_is_unknown():
    known = set(FIELDS) | set(SECTIONS) | set(ALIASES)
    for token in ticked(MARKDOWN):
        if DOTTED.match(token) and token.split(".")[0] in SECTIONS[""].sections + ("root",):
            assert token in known, f"CONFIG.md mentions `{token}`, which is not a field"


def test_markdown_lists_every_rule():
    rules_part = MARKDOWN.split("\n## Rules\n", 1)[1]
    for rule in RULES:
        assert f"`{rule.check}`" in rules_part and rule.message in rules_part


# --- JSON Schema ----------------------------------------------------------------------------------

TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "null": lambda v: v is None,
}
KNOWN_KEYWORDS = {
    "$schema",
    "$comment",
    "title",
    "description",
    "default",
    "deprecated",
    "type",
    "properties",
    "additionalProperties",
    "items",
    "anyOf",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "pattern",
}


def validate(schema, value, where="$"):
    """The errors of value against the subset of JSON Schema the generator emits."""
    unknown = set(schema) - KNOWN_KEYWORDS
    assert not unknown, f"{where}: the schema uses keywords this checker lacks: {unknown}"
    errors = []
    if "anyOf" in schema:
        if all(validate(option, value, where) for option in schema["anyOf"]):
            errors.append(f"{where}: matches none of anyOf")
    if "type" in schema and not TYPES[schema["type"]](value):
        return errors + [f"{where}: expected {schema['type']}, found {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and not value > schema["exclusiveMinimum"]:
            errors.append(f"{where}: {value} <= exclusiveMinimum {schema['exclusiveMinimum']}")
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{where}: not finite")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += validate(schema["items"], item, f"{where}[{index}]")
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key in schema["properties"]:
                errors += validate(schema["properties"][key], item, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected key {key!r}")
    return errors


def section_schema(path):
    node = SCHEMA
    for part in path.split(".") if path else []:
        node = node["properties"][part]
        if "anyOf" in node and "properties" not in node:  # a section with a shorthand
            node = next(option for option in node["anyOf"] if option.get("type") == "object")
    return node


def field_types(schema):
    if "anyOf" in schema:
        return {t for option in schema["anyOf"] for t in field_types(option)}
    return {schema["type"]}


def test_schema_has_every_field_with_its_type_and_default():
    expected = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}
    for path, spec in FIELDS.items():
        section, _, name = path.rpartition(".")
        node = section_schema(section)["properties"][name]
        types = field_types(node)
        if spec.is_list:
            assert "array" in types, path
            items = node["items"] if "items" in node else node["anyOf"][0]["items"]
            assert items["type"] == expected[spec.item_type], path
        else:
            assert expected[spec.type] in types, path
        assert ("null" in types) == spec.nullable, path
        assert node["default"] == spec.default, path
        assert node["description"] == spec.doc, path


def test_schema_properties_are_exactly_fields_sections_and_aliases():
    for path, section in SECTIONS.items():
        properties = set(section_schema(path)["properties"])
        aliases = {
            old.rsplit(".", 1)[-1]
            for old in ALIASES
            if (old.rsplit(".", 1)[0] if "." in old else "") == path
        }
        reserved = {"base", "spec_version"} if path == "" else set()
        assert properties == set(section.fields) | set(section.sections) | aliases | reserved, path


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_schema_accepts_the_canonical_form_of_every_example(path):
    config = load_config(path)
    assert validate(SCHEMA, config_to_dict(config)) == []
    assert validate(SCHEMA, yaml.safe_load(dump_yaml(config))) == []


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_schema_accepts_every_example_as_written_and_migrated(path):
    assert validate(SCHEMA, yaml.safe_load(path.read_text())) == []
    migrated = migrate_text(path.read_bytes(), str(path))
    assert validate(SCHEMA, yaml.safe_load(migrated)) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["training"].update(batch_size="x"), "$.training.batch_size: expected integer"),
        (lambda d: d["training"].update(batch_size=0), "minimum"),
        (lambda d: d["optimizer"].update(lr=0), "matches none of anyOf"),
        (lambda d: d["model"].update(score_func="relu"), "not in"),
        (lambda d: d["wandb"].update(tags=[1]), "$.wandb.tags[0]: expected string"),
        (lambda d: d["data"].update(nope=1), "unexpected key 'nope'"),
        (lambda d: d.update(nope=1), "unexpected key 'nope'"),
        (lambda d: d["system"].update(distributed=[True]), "matches none of anyOf"),
        (lambda d: d.update(spec_version=99), "maximum"),
    ],
)
def test_schema_rejects_broken_configs(change, expected):
    data = config_to_dict(load_config(REPO / "configs" / "tiny.yaml"))
    assert validate(SCHEMA, data) == []
    change(data)
    errors = validate(SCHEMA, data)
    assert any(expected in e for e in errors), errors


def test_schema_accepts_shorthands_and_float_text():
    assert (
        validate(SCHEMA, {"system": {"distributed": True, "compile": False, "device": "cpu"}}) == []
    )
    assert validate(SCHEMA, {"optimizer": {"lr": "6e-4"}}) == []
    assert validate(SCHEMA, {"optimizer": {"lr": "fast"}}) != []
