"""The generated JSON Schema and the config validator agree on a corpus of documents: each one is
accepted by both or rejected by both, checked with `jsonschema`.

The corpus: hand-written cases (among them every disagreement found before the two agreed), every
field given many kinds of values under its canonical name and each old name, every field path
written as a dotted key (`optimizer.lr: 0.005`), and seeded random mutations of the example
configs. The only allowed differences are what JSON Schema cannot express, listed in CONFIG.md
(section "JSON Schema") and in EXCEPTIONS below: the validator may reject a document the schema
accepts for those reasons only, and never the other way round.

Environment references (`${env:NAME}`): the schema accepts a well-formed reference wherever a value
may stand (an editor does not know the variable) and rejects a malformed one; the validator reads
the variables, set here to ENVIRONMENT (SCHEMA_UNSET unset). A validator's rejection caused by a
variable's value (unset without a default, or of the wrong type for the field) is the exception
"environment values"; anything else about a reference must agree.
"""

import copy
import json
import math
import random

import jsonschema
import pytest
import yaml

from codegen.generate import SCHEMA_EXCEPTIONS
from generated import ALIASES, FIELDS, SECTIONS, ConfigError, resolve
from helpers import REPO
from runtime.configlib import YAMLLoadError, check_value, load_yaml

VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((REPO / "generated" / "config.schema.json").read_text())
)
MARKDOWN = (REPO / "generated" / "CONFIG.md").read_text()

# What the validator may reject although the schema accepts it (problem kind or cause -> the
# CONFIG.md row that documents it).
EXCEPTIONS = {
    "rule": "cross-field rules",
    "duplicate": "one field under two names",
    "base": "base files",
    "count": "counts with a unit",
    "nan": "NaN",
    "environment": "environment values",
}

ENVIRONMENT = {
    "SCHEMA_INT": "4",
    "SCHEMA_FLOAT": "0.5",
    "SCHEMA_STR": "abc",
    "SCHEMA_BOOL": "true",
    "SCHEMA_NULL": "null",
    "SCHEMA_LIST": "1,2",
    "SCHEMA_EMPTY": "",
}
UNSET = "SCHEMA_UNSET"

ENV_VALUES = [
    "${env:SCHEMA_INT}",
    "${env:SCHEMA_FLOAT}",
    "${env:SCHEMA_STR}",
    "${env:SCHEMA_BOOL}",
    "${env:SCHEMA_NULL}",
    "${env:SCHEMA_LIST}",
    "${env:SCHEMA_EMPTY}",
    "${env:SCHEMA_UNSET}",
    "${env:SCHEMA_UNSET,7}",
    "${env:SCHEMA_UNSET,}",
    "x/${env:SCHEMA_STR}/y",
    "${env:SCHEMA_INT}${env:SCHEMA_UNSET,0}",
    # malformed: both reject
    "${env:}",
    "${env:1X}",
    "${env:SCHEMA_INT",
    "${env:SCHEMA_INT}/${env:",
    # not references: plain strings
    "${ENV:SCHEMA_INT}",
    "$SCHEMA_INT",
    "${SCHEMA_INT}",
    ["${env:SCHEMA_INT}"],
    ["${env:SCHEMA_STR}", "b"],
    ["${env:}"],
]
"""Values with environment references, given to every field like the others."""


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(UNSET, raising=False)


HAND_WRITTEN = [
    "",
    "\n",
    "# only a comment\n",
    "model:\n",
    "model: {}\n",
    "model:\n  n_heads: 4.0\n",
    "model:\n  n_heads: 4.5\n",
    "optimizer:\n  lr: .inf\n",
    "optimizer:\n  lr: -.inf\n",
    "optimizer:\n  lr: .nan\n",
    "model:\n  rope_theta: 1.0e+400\n",
    'optimizer:\n  lr: " 6e-4 "\n',
    'optimizer:\n  lr: "6e-4"\n',
    "optimizer:\n  lr: 6e-4\n",
    'optimizer:\n  lr: "-1"\n',
    'optimizer:\n  beta1: "2"\n',
    "optimizer:\n  beta1: 2\n",
    "optimizer:\n  lr: 0\n",
    "optimizer:\n  lr: 1\n",
    "training:\n  seed: abc\n",
    "training:\n  seed: 3\n",
    "model:\n  hidden_size: -5\n",
    "model:\n  hidden_size: 64\n",
    "model:\n  hidden_size: 64\n  dim: 64\n",
    "model:\n  hidden_size: 64\n  dim: 32\n",
    "system:\n  torch_dtype: fp8\n",
    "system:\n  torch_dtype: bfloat16\n",
    "moe_training: 5\n",
    "moe_training:\n  z_loss_weight: 0.1\n",
    "moe_training:\n  z_loss_weight: -0.1\n",
    "system:\n  device: cuda\n",
    "system:\n  device: 5\n",
    "system:\n  distributed: true\n",
    "system:\n  distributed: yes\n",
    "system:\n  distributed: [true]\n",
    "system:\n  compile: {compile: true, compile_mode: fast}\n",
    "system: cpu\n",
    "spec_version: 1\n",
    "spec_version: 0\n",
    "spec_version: 99\n",
    "spec_version: true\n",
    "base: missing.yaml\n",
    "base: [a.yaml, 5]\n",
    "base: 5\n",
    "[1, 2]\n",
    "just text\n",
    "seed: 1:00\n",
    "seed: 0o17\n",
    "seed: 0x10\n",
    "seed: -1\n",
    "seed: 18446744073709551616\n",
    "training:\n  max_iters: 1e3\n",
    "training:\n  max_iters: 1.5e3\n",
    "schedule:\n  phase_steps: [1, 2.0]\n",
    "schedule:\n  phase_steps: [1, 2.5]\n",
    "schedule:\n  phase_steps: 5\n",
    "wandb:\n  tags: [a, 1]\n",
    "wandb:\n  tags: a\n",
    "wandb:\n  run_name: null\n",
    "wandb:\n  project: null\n",
    "model:\n  top_k: 100\n",
    "data:\n  dataset: bin\n",
    "data:\n  dataset: parquet\n",
    "checkpointer:\n  resume_from: latest\n",
    "nope: 1\n",
    "model:\n  nope: 1\n",
    "model:\n  dim:\n    a: 1\n",
    "training: 5\n",
    # list[record] fields (data.sources): valid lists, items of the wrong kind, unknown and
    # missing keys, out-of-range and mistyped values
    "data:\n  sources: []\n",
    "data:\n  sources:\n    - path: a\n      weight: 0.5\n    - path: b\n",
    "data:\n  sources: [{path: a}, {path: b, weight: 2}]\n",
    "data:\n  sources: [{path: a, weight: 4}]\n",
    "data:\n  sources:\n    - weight: 1\n",
    "data:\n  sources: [{}]\n",
    "data:\n  sources: [{path: a, wieght: 1}]\n",
    "data:\n  sources: [{path: a, weight: 0}]\n",
    "data:\n  sources: [{path: a, weight: -1}]\n",
    "data:\n  sources: [{path: a, weight: .inf}]\n",
    "data:\n  sources: [{path: a, weight: .nan}]\n",
    "data:\n  sources: [{path: a, weight: true}]\n",
    'data:\n  sources: [{path: a, weight: "1"}]\n',
    "data:\n  sources: [{path: 5}]\n",
    "data:\n  sources: [{path: null}]\n",
    "data:\n  sources: [{path: None}]\n",
    "data:\n  sources:\n    path: a\n",
    "data:\n  sources: [a, b]\n",
    "data:\n  sources:\n    -\n",
    "data:\n  sources: [[{path: a}]]\n",
    "data:\n  sources: null\n",
    "data:\n  sources: a\n",
    # dotted keys: a path below the mapping written as one key
    "optimizer.lr: 0.005\n",
    "optimizer.lr: x\n",
    "optimizer.lr: 0.005\noptimizer:\n  lr: 0.005\n",
    "optimizer.lr: 0.005\noptimizer:\n  lr: 0.006\n",
    "system.device.dtype: bfloat16\n",
    "system:\n  device.dtype: bfloat16\n",
    "system:\n  device.dtype: fp8\n",
    "system.device: cuda\n",
    "system.device: {dtype: float16}\n",
    "system.distributed: true\n",
    "system.distributed: [true]\n",
    "training.eval_interval: 5\n",
    "model.hidden_size: 64\n",
    "system.device_type: cpu\n",
    "lr_schedule.min_lr: 0.0001\n",
    "moe_training.z_loss_weight: 0.1\n",
    "lr_schedule:\n  warmup_iters: 5\n",
    "optimizer.nope: 1\n",
    "model.dim.x: 1\n",
    "system.device.dtype.x: 1\n",
    "optimizer.: 1\n",
    ".optimizer: 1\n",
    "model:\n  model.dim: 64\n",
    # environment references where a value may stand, and where none may
    "optimizer.lr: ${env:SCHEMA_FLOAT}\n",
    "system:\n  distributed: ${env:SCHEMA_BOOL}\n",
    "system:\n  distributed: ${env:SCHEMA_STR}\n",
    "system: ${env:SCHEMA_STR}\n",
    "model: ${env:SCHEMA_STR}\n",
    "spec_version: ${env:SCHEMA_INT}\n",
    "base: ${env:SCHEMA_STR}\n",
    'data:\n  sources: ["${env:SCHEMA_STR}"]\n',
    "data:\n  sources:\n    - path: ${env:SCHEMA_STR}/corpus\n      weight: ${env:SCHEMA_FLOAT}\n",
    "data:\n  sources:\n    - path: a\n      weight: ${env:SCHEMA_STR}\n",
    "data:\n  sources: ${env:SCHEMA_LIST}\n",
    "wandb:\n  tags:\n    - ${env:SCHEMA_STR}\n    - ${env:}\n",
    "wandb:\n  api_key: ${env:SCHEMA_STR}\n",
    "wandb:\n  api_key: <secret>\n",
    "${env:SCHEMA_STR}: 1\n",
]

BASE_VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    7,
    2**40,
    10**400,
    4.0,
    4.5,
    -0.5,
    1e-9,
    math.inf,
    -math.inf,
    "x",
    "",
    "6e-4",
    "1",
    "yes",
    [],
    [1],
    [1.5],
    ["a"],
    [None],
    {"a": 1},
]


def candidate_values(spec):
    values = list(BASE_VALUES) + copy.deepcopy(ENV_VALUES) + [copy.deepcopy(spec.default)]
    for bound in (spec.min, spec.max, spec.gt):
        if bound is not None:
            values += [bound, bound - 1, bound + 0.5, bound - 1e-9]
    if spec.choices:
        values += list(spec.choices) + [str(spec.choices[0]).upper()]
    if spec.item_type in ("steps", "tokens"):  # counts with a unit, well and badly written
        counts = ["2K steps", "10K tokens", "1.5 tokens", "469B", "0 tokens", "12 stepz", "3 step"]
        values += [[count] for count in counts] if spec.is_list else counts
    if spec.record is not None:
        values += record_lists(spec)
    return values


def record_lists(spec):
    """Values of a list[record] field: valid lists, items that are not mappings, unknown and
    missing keys, and each key of an otherwise valid item given each of its candidate values."""
    keys = spec.record.fields
    valid = {}  # the required keys, each with a value the validator takes
    for key in keys:
        if key.required:
            valid[key.name] = next(v for v in candidate_values(key) if check_value(key, v) is None)
    lists = [[valid], [valid, dict(valid)], [{}], [valid, 1], [valid, None], [valid, [valid]]]
    lists += [[dict(valid, nope=1)], [dict(valid, **{keys[-1].name + "s": 1})]]
    for key in keys:
        lists += [[dict(valid, **{key.name: value})] for value in candidate_values(key)]
        if key.required:
            lists.append([{k: v for k, v in valid.items() if k != key.name}])
    return lists


def nested(path, value):
    document = value
    for part in reversed(path.split(".")):
        document = {part: document}
    return document


def field_documents():
    """Each field, under its canonical path and every old name, given each candidate value."""
    section_aliases = {old: new for old, new in ALIASES.items() if new in SECTIONS}
    for path, spec in FIELDS.items():
        names = [path] + list(spec.aliases)
        parent, _, leaf = path.rpartition(".")
        names += [f"{old}.{leaf}" for old, new in section_aliases.items() if new == parent]
        for name in names:
            for value in candidate_values(spec):
                yield nested(name, value)


def dotted_documents():
    """Each field path and old name written as dotted keys: one key at the root, and the first
    key nested with the rest dotted (`system: {device.dtype: ...}`), with a few values."""
    for path, spec in FIELDS.items():
        for name in [path] + list(spec.aliases):
            if "." not in name:
                continue
            head, rest = name.split(".", 1)
            for value in (copy.deepcopy(spec.default), "x", -1, "${env:SCHEMA_INT}"):
                yield {name: value}
                yield {head: {rest: value}}


def mutated_documents(count, seed=0):
    """Example configs with random fields, sections and keys broken or replaced."""
    rng = random.Random(seed)
    examples = [
        load_yaml((REPO / "configs" / name).read_bytes())
        for name in ("tiny.yaml", "deepseek_v3.yaml")
    ]
    paths = list(FIELDS)
    for _ in range(count):
        document = json.loads(json.dumps(rng.choice(examples)))
        for _ in range(rng.randint(1, 4)):
            path = rng.choice(paths)
            parent, _, leaf = path.rpartition(".")
            node = document
            for part in parent.split(".") if parent else []:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            action = rng.random()
            if action < 0.6:
                node[leaf] = rng.choice(candidate_values(FIELDS[path]))
            elif action < 0.7:
                node[leaf + rng.choice(["_", "s", "x"])] = 1
            elif action < 0.8 and parent:
                container = document
                for part in parent.split(".")[:-1]:
                    container = container[part]
                container[parent.split(".")[-1]] = rng.choice(BASE_VALUES)
            elif action < 0.9 and FIELDS[path].aliases:
                alias = rng.choice(FIELDS[path].aliases)
                node[leaf] = FIELDS[path].default
                target = document
                for part in alias.split(".")[:-1]:
                    target = (
                        target.setdefault(part, {})
                        if isinstance(target.get(part, {}), dict)
                        else {}
                    )
                target[alias.split(".")[-1]] = rng.choice(candidate_values(FIELDS[path]))
            else:
                node.pop(leaf, None)
        yield document


def has_nan(value):
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(has_nan(v) for v in value)
    return False


def verdict(text):
    """(document, validator accepts, exceptions the validator's rejection falls under) or None when
    the text is not YAML data (outside what a schema can see)."""
    try:
        document = load_yaml(text)
    except YAMLLoadError:
        return None
    try:
        resolve(text=text)
    except ConfigError as error:
        causes = set()
        for problem in error.problems:
            from_environment = problem.source is not None and problem.source.env
            if problem.kind == "env" and "is not set" in problem.message:
                causes.add("environment")  # the variable's value decides
            elif problem.kind == "value" and from_environment:
                causes.add("environment")
            elif problem.kind in ("rule", "duplicate"):
                causes.add(problem.kind)
            elif problem.path == "base":
                causes.add("base")
            elif "is not a whole number of" in problem.message or " = step " in problem.message:
                causes.add("count")
            elif has_nan(document) and "finite" in problem.message:
                causes.add("nan")
            else:
                causes.add("schema-expressible")
        return document, False, causes
    return document, True, set()


def as_text(document):
    return (
        document
        if isinstance(document, str)
        else yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    )


def corpus():
    return (
        HAND_WRITTEN
        + [as_text(d) for d in field_documents()]
        + [as_text(d) for d in dotted_documents()]
        + [as_text(d) for d in mutated_documents(400)]
    )


@pytest.mark.slow
def test_schema_and_validator_agree_on_the_corpus():
    documents = corpus()
    compared = excepted = 0
    disagreements = []
    for text in documents:
        result = verdict(text)
        if result is None:
            continue
        document, accepted, causes = result
        schema_accepts = VALIDATOR.is_valid(document)
        compared += 1
        if accepted == schema_accepts:
            continue
        if schema_accepts and not accepted and causes and causes <= set(EXCEPTIONS):
            excepted += 1
            continue
        side = (
            "schema accepts, validator rejects"
            if schema_accepts
            else "validator accepts, schema rejects"
        )
        disagreements.append(f"{side}: {text!r}")
    assert compared >= 300, f"only {compared} documents compared"
    assert not disagreements, (
        f"{len(disagreements)} of {compared} documents disagree:\n" + "\n".join(disagreements[:30])
    )
    assert excepted > 0  # the exceptions are exercised, not just listed


def test_the_exceptions_are_the_ones_config_md_lists():
    listed = {name for name, _ in SCHEMA_EXCEPTIONS}
    assert set(EXCEPTIONS.values()) <= listed
    part = MARKDOWN.split("\n## JSON Schema\n", 1)[1]
    for name, what in SCHEMA_EXCEPTIONS:
        assert f"| {name} | {what} |" in part


def test_the_formerly_disagreeing_documents_are_now_judged_alike():
    # rejected by both now
    for text in (
        'optimizer:\n  lr: "-1"\n',
        "optimizer:\n  lr: .inf\n",
        "model:\n  rope_theta: 1.0e+400\n",
        "training:\n  seed: abc\n",
        "model:\n  hidden_size: -5\n",
        "system:\n  torch_dtype: fp8\n",
        "moe_training: 5\n",
        'optimizer:\n  lr: " 6e-4 "\n',
    ):
        document, accepted, _ = verdict(text)
        assert not accepted and not VALIDATOR.is_valid(document), text
    # accepted by both now
    for text in ("", "model:\n", "model:\n  n_heads: 4.0\n"):
        document, accepted, _ = verdict(text)
        assert accepted and VALIDATOR.is_valid(document), text


def test_dotted_keys_and_environment_references_are_judged_alike():
    for text in (
        "optimizer.lr: 0.005\n",
        "system:\n  device.dtype: bfloat16\n",
        "system.distributed: true\n",
        "training.eval_interval: 5\n",  # an old name, dotted
        "optimizer:\n  lr: ${env:SCHEMA_FLOAT}\n",
        "out_dir: ${env:SCHEMA_STR}/runs/x\n",
        "model:\n  score_func: ${env:SCHEMA_UNSET,softmax}\n",
        "wandb:\n  tags:\n    - ${env:SCHEMA_STR}\n",
    ):
        document, accepted, _ = verdict(text)
        assert accepted and VALIDATOR.is_valid(document), text
    for text in (
        "optimizer.lr: x\n",
        "lr_schedule.min_lr: 0.0001\n",  # an old section name is not a prefix of dotted keys
        "optimizer.nope: 1\n",
        "out_dir: ${env:}/x\n",
        "model:\n  n_layers: ${env:1X}\n",
        "model: ${env:SCHEMA_STR}\n",
        "data:\n  sources: ['${env:SCHEMA_STR}']\n",
    ):
        document, accepted, _ = verdict(text)
        assert not accepted and not VALIDATOR.is_valid(document), text
    # the variable's value decides: the schema cannot know it
    for text in (
        "model:\n  n_layers: ${env:SCHEMA_STR}\n",
        "model:\n  n_layers: ${env:SCHEMA_UNSET}\n",
        "model:\n  score_func: ${env:SCHEMA_STR}\n",
    ):
        document, accepted, causes = verdict(text)
        assert VALIDATOR.is_valid(document) and not accepted and causes == {"environment"}, text
