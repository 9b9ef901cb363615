"""The generated Markdown reference lists exactly the spec's fields, and the generated JSON Schema,
checked with `jsonschema`, accepts every example config (as written and in canonical form) and
rejects broken ones. tests/test_schema_agreement.py compares schema and validator on a corpus."""

import json
import re

import jsonschema
import pytest
import yaml

from generated import ALIASES, FIELDS, RULES, SECTIONS, config_to_dict, dump_yaml, load_config
from generated.parser import migrate_text
from helpers import REPO
from runtime.configlib import load_yaml

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
        description = description.replace("\\|", "|")
        assert description.startswith(" ".join(spec.doc.split())), path
        if spec.hf:
            assert f"Hugging Face `config.json`: `{spec.hf}`" in description, path
        for value, meaning in spec.sentinels:
            assert f"`{value}`: {meaning}" in description, path
        if spec.derived:
            assert f"Null means derived: `{spec.derived}`" in description, path
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

VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def errors_of(document):
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in VALIDATOR.iter_errors(document)
    ]


def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def section_schema(path):
    node = SCHEMA
    for part in path.split(".") if path else []:
        node = node["properties"][part]
        if "anyOf" in node and "properties" not in node:  # a section with a shorthand
            node = next(option for option in node["anyOf"] if "properties" in option)
    return node


def field_types(schema):
    if "else" in schema:  # a value, or (`then`) an environment reference `${env:NAME}`
        return field_types(schema["else"])
    if "anyOf" in schema:
        return {t for option in schema["anyOf"] for t in field_types(option)}
    return {schema["type"]}


def test_schema_has_every_field_with_its_type_and_default():
    expected = {
        "int": {"integer"},
        "float": {"number"},
        "bool": {"boolean"},
        "str": {"string"},
        "steps": {"integer", "string"},  # a step count, or a count with its unit
        "tokens": {"integer", "string"},
        "record": {"object"},
    }
    for path, spec in FIELDS.items():
        section, _, name = path.rpartition(".")
        node = section_schema(section)["properties"][name]
        types = field_types(node)
        if spec.is_list:
            assert "array" in types, path
            value = node["else"]
            items = value["items"] if "items" in value else value["anyOf"][0]["items"]
            assert field_types(items) == expected[spec.item_type], path
        else:
            assert expected[spec.type] <= types, path
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


def test_an_old_name_carries_its_canonical_fields_schema():
    for old, new in ALIASES.items():
        parent, _, name = old.rpartition(".")
        if new not in FIELDS or parent not in SECTIONS:
            continue
        node = section_schema(parent)["properties"][name]
        canonical = section_schema(new.rpartition(".")[0])["properties"][new.rpartition(".")[2]]
        assert node["deprecated"] is True
        assert {k: v for k, v in node.items() if k not in ("deprecated", "description")} == {
            k: v for k, v in canonical.items() if k != "description"
        }, old


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_schema_accepts_the_canonical_form_of_every_example(path):
    config = load_config(path)
    assert errors_of(config_to_dict(config)) == []
    assert errors_of(yaml.safe_load(dump_yaml(config))) == []


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_schema_accepts_every_example_as_written_and_migrated(path):
    assert errors_of(load_yaml(path.read_bytes())) == []
    migrated = migrate_text(path.read_bytes(), str(path))
    assert errors_of(load_yaml(migrated)) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["training"].update(batch_size="x"), "'x' is not of type 'integer'"),
        (lambda d: d["training"].update(batch_size=0), "less than the minimum"),
        (lambda d: d["optimizer"].update(lr=0), "less than or equal to the minimum"),
        (lambda d: d["model"].update(score_func="relu"), "is not one of"),
        (lambda d: d["wandb"].update(tags=[1]), "1 is not of type 'string'"),
        (lambda d: d["data"].update(nope=1), "'nope' was unexpected"),
        # the root also takes dotted keys (`optimizer.lr: 0.005`): patternProperties
        (lambda d: d.update(nope=1), "'nope' does not match any of the regexes"),
        (
            lambda d: d["system"].update(distributed=[True]),
            "is not valid under any of the given schemas",
        ),
        (lambda d: d.update(spec_version=99), "greater than the maximum"),
        (lambda d: d["optimizer"].update(lr=float("inf")), "greater than the maximum"),
        (lambda d: d["model"].update(n_heads=4.5), "is not of type 'integer'"),
    ],
)
def test_schema_rejects_broken_configs(change, expected):
    data = config_to_dict(load_config(REPO / "configs" / "tiny.yaml"))
    assert errors_of(data) == []
    change(data)
    errors = errors_of(data)
    assert any(expected in e for e in errors), errors


def test_schema_accepts_shorthands_empty_files_and_empty_sections():
    assert errors_of({"system": {"distributed": True, "compile": False, "device": "cpu"}}) == []
    assert errors_of(None) == []
    assert errors_of({"model": None}) == []
    assert errors_of({"optimizer": {"lr": 6e-4}}) == []
    assert errors_of({"optimizer": {"lr": "6e-4"}}) != []  # a quoted number is a string
