"""list[record] fields, end to end: the spec language (`type: list[record]`, `record:`, `fields:`)
and its errors, the generated record dataclasses, FIELDS and PATH entries, loading items from YAML,
flags and dicts with every problem named by item path and file:line, the round trips (YAML, saved
dicts, migrate, the config commands), reconciling with a checkpoint, CONFIG.md and the JSON Schema.

The repo spec's record list is `data.sources` (items `DataSource(path, weight=1.0)`, weight > 0);
the `features` golden case has `loop.stages` (required, pattern, choice, list and nullable keys, an
old name and a rule over the items).
"""

import dataclasses
import importlib
import json
import shutil
import sys

import jsonschema
import pytest
import yaml

import generated as g
from codegen.generate import render
from codegen.spec import SpecError, load_spec
from generated.config import DataConfig, DataSource
from helpers import REPO
from runtime.cli import config as config_cli
from runtime.configlib import item_path

SCHEMA = json.loads((REPO / "generated" / "config.schema.json").read_text())
MARKDOWN = (REPO / "generated" / "CONFIG.md").read_text()


def problems_of(**kwargs):
    with pytest.raises(g.ConfigError) as raised:
        g.load_config(**kwargs)
    return raised.value.problems


def lines_of(problems):
    return [str(p) for p in problems]


# --- the spec language ----------------------------------------------------------------------------

GOOD = """\
version: 1
root:
  class: Config
  doc: Root.
  fields:
    - name: seed
      type: int
      default: 1
      doc: Seed.
sections:
  - name: data
    class: DataConfig
    doc: Data.
    fields:
      - name: sources
        type: list[record]
        record: Source
        policy: from_checkpoint
        default: []
        doc: Sources.
        fields:
          - name: path
            type: str
            doc: Where.
          - name: weight
            type: float
            default: 1.0
            gt: 0
            doc: How much.
          - name: kind
            type: str?
            default: null
            choices: [a, b]
            doc: Kind.
"""


def edit(old, new):
    assert GOOD.count(old) == 1, old
    return GOOD.replace(old, new)


SPEC_ERRORS = {
    "record without fields": (
        edit(
            "        fields:\n          - name: path\n            type: str\n            doc: Where.\n"
            "          - name: weight\n            type: float\n            default: 1.0\n"
            "            gt: 0\n            doc: How much.\n          - name: kind\n"
            "            type: str?\n            default: null\n            choices: [a, b]\n"
            "            doc: Kind.\n",
            "        fields: []  # <-\n",
        ),
        "needs 'fields': a list of the record's fields (at least one)",
    ),
    "record list without fields at all": (
        edit(
            "        fields:\n          - name: path",
            "        fieldz:  # <-\n          - name: path",
        ),
        "unknown spec attribute 'fieldz'; did you mean 'fields'?",
    ),
    "record list without a class name": (
        edit("        record: Source\n", "").replace(
            "      - name: sources\n", "      - name: sources  # <-\n"
        ),
        "needs 'record': the class name of its items",
    ),
    "record class name that is not a class name": (
        edit("record: Source", "record: my source  # <-"),
        "'record' must be a class name",
    ),
    "record class name taken by a section": (
        edit("record: Source", "record: DataConfig").replace(
            "      - name: sources\n", "      - name: sources  # <-\n"
        ),
        "record class name 'DataConfig' is taken",
    ),
    "record list default that is not empty": (
        edit("        default: []\n", "        default: [{path: a}]  # <-\n"),
        "the default of a list[record] field must be []",
    ),
    "nullable record list": (
        edit("type: list[record]", "type: list[record]?  # <-"),
        "cannot be nullable",
    ),
    "choices on a record list": (
        edit("        record: Source\n", "        record: Source\n        choices: [x]  # <-\n"),
        "'choices' does not apply to a list[record] field",
    ),
    "record and fields on a plain field": (
        edit("      type: int\n", "      type: int\n      record: Seed  # <-\n"),
        "'record' and 'fields' only apply to list[record] fields",
    ),
    "old names on a record's field": (
        edit(
            "            doc: Where.\n", "            doc: Where.\n            aliases: [p]  # <-\n"
        ),
        "'aliases' does not apply to a record's field",
    ),
    "policy on a record's field": (
        edit(
            "            doc: Where.\n",
            "            doc: Where.\n            policy: must_match  # <-\n",
        ),
        "'policy' does not apply to a record's field",
    ),
    "records do not nest": (
        edit("            type: str\n", "            type: list[record]  # <-\n"),
        "cannot itself be a list[record]",
    ),
    "unknown type of a record's field": (
        edit("            type: str\n", "            type: path  # <-\n"),
        "field data.sources[].path: unknown type 'path'",
    ),
    "record's field default out of range": (
        edit("            default: 1.0\n", "            default: -1.0  # <-\n"),
        "field data.sources[].weight: default -1.0 does not fit: must be > 0",
    ),
    "duplicate key in a record": (
        edit("          - name: kind\n", "          - name: weight  # <-\n"),
        "duplicate name 'weight' in the record",
    ),
    "record's field name that is not an identifier": (
        edit("          - name: kind\n", "          - name: class  # <-\n"),
        "a record's field name must be a Python identifier",
    ),
    "bound on a record's str field": (
        edit("            doc: Where.\n", "            doc: Where.\n            min: 1  # <-\n"),
        "'min' only applies to number fields (int, float, steps, tokens and their lists)",
    ),
}


def marked_line(text):
    lines = [n for n, line in enumerate(text.splitlines(), 1) if "# <-" in line]
    assert len(lines) == 1, "each case marks exactly one line"
    return lines[0]


def test_the_good_record_spec_loads(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD)
    spec = load_spec(path)
    (sources,) = spec.record_lists()
    assert (sources.path, sources.type, sources.default, sources.type_text) == (
        "data.sources",
        "list[record]",
        [],
        "list[Source]",
    )
    assert sources.record.name == "Source" and sources.record.keys == ("path", "weight", "kind")
    assert [(f.path, f.required, f.default) for f in spec.record_fields()] == [
        ("data.sources[].path", True, None),
        ("data.sources[].weight", False, 1.0),
        ("data.sources[].kind", False, None),
    ]
    assert all(f.policy == "from_checkpoint" for f in spec.record_fields())
    assert [f.path for f in spec.fields()] == ["seed", "data.sources"]  # flags: the list only


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_record_spec_errors_name_file_and_line(case, tmp_path):
    text, expected = SPEC_ERRORS[case]
    path = tmp_path / "bad_spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    line = marked_line(text)
    matching = [p for p in raised.value.problems if expected in p]
    assert matching, f"no problem mentions {expected!r}: {raised.value.problems}"
    assert any(p.startswith(f"{path}:{line}: ") for p in matching), (line, matching)


def test_the_spec_header_documents_the_syntax():
    header = (REPO / "spec" / "config.yaml").read_text().split("\nversion:", 1)[0]
    for text in ("list[record]", "record: ClassName", "fields:", "required", "[]"):
        assert text in header, text


# --- generated code -------------------------------------------------------------------------------


def test_the_record_dataclass_has_the_spec_fields_defaults_and_docs():
    assert dataclasses.is_dataclass(DataSource) and DataSource.__slots__ == ("path", "weight")
    assert DataSource(path="a") == DataSource(path="a", weight=1.0)
    with pytest.raises(TypeError):
        DataSource("a")  # keyword-only
    with pytest.raises(TypeError):
        DataSource(weight=1.0)  # path is required
    assert DataConfig().sources == [] and DataConfig().sources is not DataConfig().sources
    assert {f.name: f.type for f in dataclasses.fields(DataConfig)}["sources"] == list[DataSource]
    source = (REPO / "generated" / "config.py").read_text()
    assert "@dataclass(kw_only=True, slots=True)\nclass DataSource:" in source
    assert "    sources: list[DataSource] = field(default_factory=list)\n" in source
    assert '    path: str\n    """A prepared dataset folder' in source
    assert '    weight: float = 1.0\n    """Relative share' in source


def test_records_built_in_code_are_checked():
    with pytest.raises(ValueError, match=r"data\.sources\[\]\.weight: must be > 0, found 0"):
        DataSource(path="a", weight=0)
    with pytest.raises(ValueError, match=r"data\.sources\[\]\.path: expected a string, found 5"):
        DataSource(path=5)
    with pytest.raises(ValueError, match=r"data\.sources\[1\]: expected a DataSource, found"):
        DataConfig(sources=[DataSource(path="a"), {"path": "b"}])
    with pytest.raises(ValueError, match="expected a list of DataSource items"):
        DataConfig(sources=DataSource(path="a"))


def test_fields_and_path_name_the_record_fields():
    spec = g.FIELDS["data.sources"]
    assert (spec.type, spec.type_text, spec.default, spec.policy) == (
        "list[record]",
        "list[DataSource]",
        [],
        "from_checkpoint",
    )
    assert spec.record.cls is DataSource and spec.record.name == "DataSource"
    assert [(f.path, f.type, f.required, f.default, f.gt) for f in spec.record.fields] == [
        ("data.sources[].path", "str", True, None, None),
        ("data.sources[].weight", "float", False, 1.0, 0),
    ]
    assert "data.sources[].weight" not in g.FIELDS  # a key of each item, not a flag
    assert g.PATH.data.sources == "data.sources"
    assert g.PATH.data.DataSource.FIELD == "data.sources"
    assert g.PATH.data.DataSource.weight == "data.sources[].weight"
    assert item_path(g.PATH.data.DataSource.weight, 3) == "data.sources[3].weight"
    assert item_path(g.PATH.data.sources, 3, "path") == "data.sources[3].path"
    assert g.SECTIONS["data"].fields.index("sources") == g.SECTIONS["data"].fields.index("path") + 1


# --- loading: YAML files, flags, dicts ------------------------------------------------------------


def test_items_load_from_block_and_flow_yaml():
    block = "data:\n  sources:\n    - path: a\n      weight: 0.7\n    - path: b\n"
    flow = "data:\n  sources: [{path: a, weight: 0.7}, {path: b, weight: 1}]\n"
    expected = [DataSource(path="a", weight=0.7), DataSource(path="b", weight=1.0)]
    for text in (block, flow):
        config = g.load_config(text=text)
        assert config.data.sources == expected
        assert all(type(s) is DataSource for s in config.data.sources)
        assert type(config.data.sources[1].weight) is float  # 1 became 1.0
    assert g.load_config(text="data:\n  sources: []\n").data.sources == []
    assert g.load_config(text="").data.sources == []


BAD_FILE = """\
data:
  dataset: stdlib
  sources:
    - path: a
      weight: 0.7
    - path: b
      weight: -1
    - wieght: 2
    - 5
    - {path: c, weight: x, extra: 1}
training:
  batch_size: 0
"""


def test_every_item_problem_names_its_path_and_line_all_together(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(BAD_FILE)
    problems = problems_of(path=path)
    assert lines_of(problems) == [
        f"{path}:12: training.batch_size: must be >= 1, found 0",  # spec order: training first
        f"{path}:7: data.sources[1].weight: must be > 0, found -1",
        f"{path}:8: data.sources[2].wieght: unknown key 'wieght' in a DataSource item; did you mean 'weight'?",
        f"{path}:8: data.sources[2]: missing required key 'path' (each DataSource item needs it)",
        f"{path}:9: data.sources[3]: expected a DataSource item, a mapping with keys path, weight; found 5",
        f"{path}:10: data.sources[4].extra: unknown key 'extra' in a DataSource item; expected one of path, weight",
        f"{path}:10: data.sources[4].weight: expected a number, found 'x'",
    ]
    kinds = [p.kind for p in problems]
    assert kinds == ["value", "value", "key", "key", "value", "key", "value"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:\n  sources: 5\n", "<text>:2: data.sources: expected a list of DataSource items"),
        ("data:\n  sources: null\n", "<text>:2: data.sources: expected a list of DataSource items"),
        (
            "data:\n  sources:\n    path: a\n",
            "<text>:2: data.sources: expected a list of DataSource items, found a single mapping",
        ),
        ("data:\n  sources:\n    -\n", "<text>:3: data.sources[0]: expected a DataSource item"),
        ("data:\n  sources: [[{path: a}]]\n", "<text>:2: data.sources[0]: expected a DataSource"),
        ("data:\n  sources: [{}]\n", "<text>:2: data.sources[0]: missing required key 'path'"),
        (
            "data:\n  sources:\n  - path: null\n",
            "<text>:3: data.sources[0].path: expected a value, found null",
        ),
        (
            "data:\n  sources:\n  - path: a\n    weight: true\n",
            "<text>:4: data.sources[0].weight: expected a number, found True",
        ),
        (
            "data:\n  sources:\n  - path: a\n    weight: .inf\n",
            "<text>:4: data.sources[0].weight: expected a finite number, found inf",
        ),
        (
            "data:\n  sources:\n  - path: a\n  - path: b\n    weight: 0\n",
            "<text>:5: data.sources[1].weight: must be > 0, found 0",
        ),
    ],
)
def test_each_kind_of_problem(text, expected):
    problems = problems_of(text=text)
    assert any(str(p).startswith(expected) for p in problems), lines_of(problems)


def test_a_problem_in_a_base_file_names_the_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  sources:\n    - path: a\n      weight: 0\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nseed: 3\n")
    problems = problems_of(path=tmp_path / "child.yaml")
    assert lines_of(problems) == [
        f"{tmp_path / 'base.yaml'}:4: data.sources[0].weight: must be > 0, found 0"
    ]


def test_a_long_hostile_key_stays_readable():
    with pytest.raises(g.ConfigError) as raised:
        g.config_from_dict({"data": {"sources": [{"path": "a", "k" * 5000: 1}]}})
    (problem,) = raised.value.problems
    assert len(str(problem)) < 300 and "unknown key 'kkkk" in str(problem)


def test_the_flag_takes_yaml_flow_syntax():
    flow = "[{path: a, weight: 0.7}, {path: b, weight: 0.3}]"
    config = g.load_config(argv=["--data.sources", flow])
    assert config.data.sources == [
        DataSource(path="a", weight=0.7),
        DataSource(path="b", weight=0.3),
    ]
    assert g.load_config(argv=[f"--data.sources={flow}"]) == config
    assert g.load_config(argv=["--data.sources", ""]).data.sources == []
    # the flag replaces the whole list a file gives
    resolved = g.resolve(text="data:\n  sources: [{path: x}]\n", argv=["--data.sources", flow])
    assert resolved.config.data.sources == config.data.sources
    assert resolved.sources["data.sources"].kind == "cli"
    assert g.FLAGS["data.sources"] == "data.sources"


def test_flag_problems_name_the_flag_and_the_item():
    problems = problems_of(argv=["--data.sources", "[{path: a, weight: -0.5}, {pth: b}]"])
    assert lines_of(problems) == [
        "command line --data.sources: data.sources[0].weight: must be > 0, found -0.5",
        "command line --data.sources: data.sources[1].pth: unknown key 'pth' in a DataSource item; did you mean 'path'?",
        "command line --data.sources: data.sources[1]: missing required key 'path' (each DataSource item needs it)",
    ]
    assert all(p.source.kind == "cli" for p in problems)
    (single,) = problems_of(argv=["--data.sources", "{path: a, weight: 1}"])  # not a list
    assert str(single).startswith(
        "command line --data.sources: data.sources: expected a list of DataSource items"
    )
    (unparsable,) = problems_of(argv=["--data.sources", "[{path: a"])
    assert unparsable.path == "data.sources" and "expected a list of DataSource items" in str(
        unparsable
    )


def test_help_describes_the_items():
    help_text = " ".join(g.build_arg_parser().format_help().split())
    assert "--data.sources LIST[DATASOURCE]" in help_text
    assert "Each item: {path: STR, weight: FLOAT = 1.0}" in help_text


def test_dicts_load_items_and_report_problems():
    config = g.config_from_dict({"data": {"sources": [{"path": "a"}, {"path": "b", "weight": 2}]}})
    assert config.data.sources == [DataSource(path="a"), DataSource(path="b", weight=2.0)]
    with pytest.raises(g.ConfigError) as raised:
        g.config_from_dict({"data": {"sources": [{"path": "a", "weight": -1}, {"weigth": 1}]}})
    assert [(p.path, p.kind) for p in raised.value.problems] == [
        ("data.sources[0].weight", "value"),
        ("data.sources[1].weigth", "key"),
        ("data.sources[1]", "key"),
    ]
    assert all(str(p.source) == "<dict>" for p in raised.value.problems)


# --- round trips ----------------------------------------------------------------------------------

SOURCES = "data:\n  sources:\n    - path: corpus/a\n      weight: 0.7\n    - path: b.bin\n"


def test_dump_yaml_and_the_saved_dict_round_trip():
    config = g.load_config(text=SOURCES)
    dumped = g.dump_yaml(config)
    assert (
        "  sources:\n  - path: corpus/a\n    weight: 0.7\n  - path: b.bin\n    weight: 1.0\n"
        in (dumped)
    )
    assert g.load_config(text=dumped) == config
    saved = g.to_saved_dict(config)
    assert saved["data"]["sources"] == [
        {"path": "corpus/a", "weight": 0.7},
        {"path": "b.bin", "weight": 1.0},
    ]
    assert g.config_from_dict(saved) == config
    assert g.config_from_dict(json.loads(json.dumps(saved))) == config  # as a checkpoint stores it
    assert g.config_from_dict(yaml.safe_load(yaml.safe_dump(saved))) == config


def test_flat_values_and_nest_give_plain_items():
    config = g.load_config(text=SOURCES)
    values = g.flat_values(config)
    assert values["data.sources"] == [
        {"path": "corpus/a", "weight": 0.7},
        {"path": "b.bin", "weight": 1.0},
    ]
    assert g.load_config(text=yaml.safe_dump(g.nest({"data.sources": values["data.sources"]})))


def test_a_config_built_in_code_counts_its_items_as_set():
    config = g.Config(data=DataConfig(sources=[DataSource(path="a")]))
    resolved = g.resolved_from_config(config)
    assert resolved.config.data == config.data and resolved.sources["data.sources"].explicit
    assert not g.resolved_from_config(g.Config()).sources["data.sources"].explicit


def test_migrate_keeps_the_items_and_rewrites_old_names():
    text = "data:\n  dataset_name: stdlib\n  sources:\n  - {path: a, weight: 1}\n  - path: b\n"
    migrated = g.migrate_text(text)
    assert yaml.safe_load(migrated)["data"] == {
        "dataset": "stdlib",
        "sources": [{"path": "a", "weight": 1.0}, {"path": "b"}],
    }
    assert g.load_config(text=migrated) == g.load_config(text=text)


@pytest.fixture
def cli(monkeypatch, capsys):
    monkeypatch.chdir(REPO)

    def run(*argv):
        code = config_cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_config_show_explain_and_diff(tmp_path, cli):
    a = tmp_path / "a.yaml"
    a.write_text(SOURCES)
    b = tmp_path / "b.yaml"
    b.write_text("base: a.yaml\ndata:\n  sources: [{path: corpus/a, weight: 0.5}]\n")
    code, out, _ = cli("show", str(a))
    assert code == 0 and g.load_config(text=out) == g.load_config(a)
    code, out, _ = cli("show", "--changed", str(a))
    assert code == 0 and yaml.safe_load(out) == {
        "data": {"sources": [{"path": "corpus/a", "weight": 0.7}, {"path": "b.bin", "weight": 1.0}]}
    }
    code, out, _ = cli("explain", str(b), "data.sources")
    assert code == 0
    assert out.splitlines()[:3] == [
        "data.sources = [{'path': 'corpus/a', 'weight': 0.5}]",
        f"  from {b}:3",
        f"  overrides [{{'path': 'corpus/a', 'weight': 0.7}}, {{'path': 'b.bin'}}] from {a}:2 (base file)",
    ]
    code, out, _ = cli("diff", str(a), str(b))
    assert code == 0 and out.startswith("data.sources: [{'path': 'corpus/a', 'weight': 0.7}, ")
    code, out, _ = cli("migrate", str(b))
    assert code == 0 and yaml.safe_load(out)["data"]["sources"] == [
        {"path": "corpus/a", "weight": 0.5}
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources:\n    - weight: 2\n")
    code, _, err = cli("validate", str(bad))
    assert code == 2 and f"{bad}:3: data.sources[0]: missing required key 'path'" in err


# --- reconciling with a checkpoint ----------------------------------------------------------------


def test_the_checkpoint_list_is_taken_unless_set_and_compared_whole():
    saved = g.to_saved_dict(
        g.load_config(text="data:\n  sources: [{path: a, weight: 0.7}, {path: b, weight: 0.3}]\n")
    )
    resolved, notes = g.reconcile_with_checkpoint(g.resolve(text=""), saved, "ckpt")
    assert resolved.config.data.sources == [
        DataSource(path="a", weight=0.7),
        DataSource(path="b", weight=0.3),
    ]
    assert any(n.startswith("data.sources = [{'path': 'a', 'weight': 0.7}, ") for n in notes)
    # one weight differs: the whole list is compared, and this run's explicit list wins
    run = g.resolve(text="data:\n  sources: [{path: a, weight: 0.7}, {path: b, weight: 0.4}]\n")
    resolved, notes = g.reconcile_with_checkpoint(run, saved, "ckpt")
    assert resolved.config.data.sources[1].weight == 0.4
    assert any(n.startswith("data.sources: this run's") for n in notes)
    # the same list (written with a default left out) is no change
    same = g.resolve(text="data:\n  sources: [{path: a, weight: 0.7}, {path: b, weight: 0.3}]\n")
    assert g.reconcile_with_checkpoint(same, saved, "ckpt")[1] == []


# --- CONFIG.md and the JSON Schema ----------------------------------------------------------------


def test_config_md_documents_the_items():
    row = next(line for line in MARKDOWN.splitlines() if line.startswith("| `data.sources` |"))
    assert "| `list[DataSource]` | `[]` |" in row and "from_checkpoint" in row
    assert "[below](#datasources-items)" in row
    part = MARKDOWN.split("\n### `data.sources` items\n", 1)[1].split("\n## ", 1)[0]
    assert "class `DataSource`" in part and "--data.sources '[{path: PATH, weight: WEIGHT}" in part
    assert "- `path` (`str`, required): A prepared dataset folder" in part
    assert "- `weight` (`float`, default `1.0`, > 0): Relative share" in part
    assert MARKDOWN.index("| `data.sources` |") < MARKDOWN.index("### `data.sources` items")
    assert MARKDOWN.index("### `data.sources` items") < MARKDOWN.index("\n## evaluator\n")


def test_the_schema_describes_the_items():
    def value(node):  # a value's own schema (`then`: an environment reference `${env:NAME}`)
        return node["else"]

    node = SCHEMA["properties"]["data"]["properties"]["sources"]
    assert value(node)["type"] == "array" and node["default"] == []
    items = value(node)["items"]
    assert items["type"] == "object" and items["additionalProperties"] is False
    assert items["required"] == ["path"]
    assert set(items["properties"]) == {"path", "weight"}
    assert value(items["properties"]["path"])["type"] == "string"
    assert "default" not in items["properties"]["path"]
    weight = items["properties"]["weight"]
    assert (value(weight)["type"], value(weight)["exclusiveMinimum"], weight["default"]) == (
        "number",
        0,
        1.0,
    )


@pytest.mark.parametrize(
    "sources, valid",
    [
        ([], True),
        ([{"path": "a"}, {"path": "b", "weight": 2}], True),
        ([{"weight": 2}], False),
        ([{"path": "a", "wieght": 2}], False),
        ([{"path": "a", "weight": 0}], False),
        ([{"path": "a", "weight": "1"}], False),
        (["a"], False),
        ({"path": "a"}, False),
    ],
)
def test_schema_and_validator_agree_on_items(sources, valid):
    document = {"data": {"sources": sources}}
    assert jsonschema.Draft202012Validator(SCHEMA).is_valid(document) is valid
    if valid:
        g.config_from_dict(document)
    else:
        with pytest.raises(g.ConfigError):
            g.config_from_dict(document)


# --- the features golden case ---------------------------------------------------------------------


@pytest.fixture
def features(tmp_path, monkeypatch):
    package = "golden_features_records"
    shutil.copytree(
        REPO / "tests" / "data" / "codegen" / "features" / "expected", tmp_path / package
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module(package)
    finally:
        for name in [n for n in sys.modules if n.startswith(package)]:
            del sys.modules[name]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_features_golden_record_list(features):
    m = features
    text = "loop:\n  stages:\n    - label: warm\n      steps: 20\n      lrs: [1, 0.5]\n    - label: main\n"
    config = m.load_config(text=text)
    assert [(s.label, s.steps, s.mode, s.lrs, s.note) for s in config.loop.stages] == [
        ("warm", 20, "fast", [1.0, 0.5], None),
        ("main", 10, "fast", [], None),
    ]
    assert m.load_config(text=m.dump_yaml(config)) == config
    assert m.config_from_dict(m.to_saved_dict(config)) == config
    assert m.load_config(text=text.replace("stages", "phases")) == config  # the old name
    assert m.CONSTANTS["loop.stages[].mode"].SLOW == "slow"
    assert m.PATH.loop.Stage.label == "loop.stages[].label"
    with pytest.raises(m.ConfigError) as raised:
        m.load_config(
            text="loop:\n  stages:\n    - label: Warm\n      mode: medium\n      lrs: [0]\n"
        )
    assert lines_of(raised.value.problems) == [
        "<text>:3: loop.stages[0].label: 'Warm' does not match lowercase letters",
        "<text>:4: loop.stages[0].mode: must be one of 'fast', 'slow', found 'medium'",
        "<text>:5: loop.stages[0].lrs: each item must be > 0, found 0.0",
    ]
    with pytest.raises(m.ConfigError, match="the stages must fit in the run"):  # a rule on items
        m.load_config(
            text="loop:\n  steps: 15\n  stages: [{label: a}, {label: b}]\n  milestones: []\n"
        )
    # one field under its name and its old name: equal lists agree, different ones do not
    same = "loop:\n  stages: [{label: a}]\n  phases: [{label: a, steps: 10}]\n"
    assert m.load_config(text=same).loop.stages == [m.config.Stage(label="a")]
    with pytest.raises(m.ConfigError, match="given twice with different values"):
        m.load_config(text="loop:\n  stages: [{label: a}]\n  phases: [{label: b}]\n")


def test_render_is_deterministic_with_records():
    first = render(REPO / "tests" / "data" / "codegen" / "features" / "spec.yaml", spec_name="x")
    second = render(REPO / "tests" / "data" / "codegen" / "features" / "spec.yaml", spec_name="x")
    assert first == second and "class Stage:" in first["config.py"]
