"""Property test: hostile config documents are accepted or rejected with a ConfigError naming a
key path and location; no other exception escapes and nothing in them is executed."""

import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import generated as g
from helpers import REPO

EXAMPLES = [
    yaml.safe_load((REPO / "configs" / name).read_text())
    for name in ("tiny.yaml", "deepseek_v3.yaml", "legacy_deepseek3.yaml")
]
KEYS = sorted({path.rsplit(".", 1)[-1] for path in list(g.FIELDS) + list(g.ALIASES)})
CANARY = "/tmp/deepseek_moe_hostile_canary"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["6e-4", "1e999", "nan", "-inf", "yes", "~", "[", "0x1F", "1_000"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def misspell(draw, key):
    if not key:
        return "x"
    position = draw(st.integers(0, len(key) - 1))
    kind = draw(st.sampled_from(["drop", "double", "swap", "case"]))
    if kind == "drop":
        return key[:position] + key[position + 1 :] or "x"
    if kind == "double":
        return key[:position] + key[position] + key[position:]
    if kind == "swap" and position + 1 < len(key):
        return key[:position] + key[position + 1] + key[position] + key[position + 2 :]
    return key.upper()


@st.composite
def mutated_document(draw):
    document = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(EXAMPLES))))  # a deep copy
    for _ in range(draw(st.integers(1, 6))):
        sections = [document] + [v for v in document.values() if isinstance(v, dict)]
        target = draw(st.sampled_from(sections))
        keys = list(target)
        action = draw(
            st.sampled_from(
                ["retype", "unknown", "misspell", "delete", "nest", "alias_conflict", "move"]
            )
        )
        if action == "retype" and keys:
            target[draw(st.sampled_from(keys))] = draw(values)
        elif action == "unknown":
            target[draw(st.text(min_size=1, max_size=30))] = draw(values)
        elif action == "misspell" and keys:
            key = draw(st.sampled_from(keys))
            target[misspell(draw, key)] = target.pop(key)
        elif action == "delete" and keys:
            del target[draw(st.sampled_from(keys))]
        elif action == "nest":
            depth = draw(st.integers(1, 60))
            nested = draw(values)
            for _ in range(depth):
                nested = {draw(st.sampled_from(KEYS)): nested}
            target[draw(st.sampled_from(KEYS))] = nested
        elif action == "alias_conflict":
            section = draw(st.sampled_from(["data", "wandb", "moe", "system"]))
            pairs = {
                "data": ("dataset", "dataset_name"),
                "wandb": ("enabled", "use_wandb"),
                "moe": ("aux_loss_weight", "load_balancing_loss_weight"),
                "system": ("torch_dtype", "dtype"),
            }
            canonical, alias = pairs[section]
            document.setdefault(section, {})
            if isinstance(document[section], dict):
                document[section][canonical] = draw(values)
                document[section][alias] = draw(values)
        elif action == "move" and keys:
            key = draw(st.sampled_from(keys))
            document[key] = target.pop(key)
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


@st.composite
def hostile_text(draw):
    kind = draw(
        st.sampled_from(
            ["mutated"] * 6 + ["empty", "bytes", "tag", "truncated", "anchors", "deep_flow"]
        )
    )
    if kind == "empty":
        return draw(st.sampled_from(["", "\n", "---\n", "# only a comment\n", "~\n"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)) + draw(
            st.sampled_from([b"\xff\xfe", b"\xc3\x28", b""])
        )
    if kind == "tag":
        tag = draw(
            st.sampled_from(
                [
                    f"!!python/object/apply:os.system ['touch {CANARY}']",
                    f"!!python/object/new:os.system ['touch {CANARY}']",
                    "!!python/name:os.system",
                    "!custom 3",
                    "!!binary aGVsbG8=",
                    "!!set {a, b}",
                ]
            )
        )
        section = draw(
            st.sampled_from(["seed", "training:\n  max_iters", "model:\n  dim", "wandb"])
        )
        return f"{section}: {tag}\n"
    if kind == "truncated":
        text = draw(mutated_document())
        return text[: draw(st.integers(0, len(text)))]
    if kind == "anchors":
        # A "billion laughs" document: aliases must not expand into huge work.
        return "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c]\nschedule:\n  phase_names: *d\n"
    if kind == "deep_flow":
        depth = draw(st.integers(100, 5000))
        return "training: " + "[" * depth + "]" * depth + "\n"
    return draw(mutated_document())


@pytest.mark.slow
@settings(
    max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(hostile_text())
def test_hostile_documents_are_accepted_or_rejected_cleanly(text):
    try:
        config = g.load_config(text=text, filename="hostile.yaml")
    except g.ConfigError as error:
        assert error.problems, "a ConfigError must carry its problems"
        for problem in error.problems:
            assert isinstance(problem.path, str)
            assert problem.source is not None, f"problem without a location: {problem}"
            assert problem.source.kind != "file" or (
                problem.source.file == "hostile.yaml" and problem.source.line >= 1
            )
            assert len(str(problem)) < 2000, "error messages stay readable"
    else:
        assert isinstance(config, g.Config)
        assert g.load_config(text=g.dump_yaml(config)) == config  # anything accepted round-trips
    assert not os.path.exists(CANARY), "a YAML tag executed code"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.text(max_size=30), max_size=6))
def test_hostile_flags_are_rejected_cleanly(argv):
    try:
        g.load_config(argv=argv)
    except g.ConfigError as error:
        assert all(
            problem.source is not None and problem.source.kind == "cli"
            for problem in error.problems
        )
