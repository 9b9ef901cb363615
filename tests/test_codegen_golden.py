"""Golden-file tests of the generator: a small spec in, the expected generated files out.

Each folder tests/data/codegen/<case>/ holds spec.yaml and expected/<every generated file>.
After a deliberate change to codegen/ or its templates, refresh the goldens with

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_codegen_golden.py

and review the diff of tests/data/codegen/ before committing.
"""

import difflib
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from codegen.generate import render
from helpers import REPO

CASES_DIR = REPO / "tests" / "data" / "codegen"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "spec.yaml").is_file())
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
UPDATE_HINT = "UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_codegen_golden.py"


@functools.cache
def render_case(case):
    return render(CASES_DIR / case / "spec.yaml", spec_name=f"{case}/spec.yaml")


@functools.cache
def render_repo_spec():
    return render(REPO / "spec" / "config.yaml", spec_name="spec/config.yaml")


def test_there_are_cases():
    assert {"minimal", "features"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    files = render_case(case)
    expected_dir = CASES_DIR / case / "expected"
    if UPDATE:
        shutil.rmtree(expected_dir, ignore_errors=True)
        expected_dir.mkdir()
        for name, text in files.items():
            (expected_dir / name).write_bytes(text.encode("utf-8"))
    on_disk = sorted(p.name for p in expected_dir.iterdir()) if expected_dir.is_dir() else []
    assert on_disk == sorted(files), (
        f"{case}: generated file set changed (expected {on_disk}, got {sorted(files)}); "
        f"if deliberate, run {UPDATE_HINT}"
    )
    mismatched = []
    for name, text in files.items():
        golden = (expected_dir / name).read_bytes().decode("utf-8")
        if golden != text:
            diff = "".join(
                difflib.unified_diff(
                    golden.splitlines(keepends=True),
                    text.splitlines(keepends=True),
                    fromfile=f"expected/{name}",
                    tofile=f"rendered/{name}",
                    n=2,
                )
            )
            mismatched.append(diff[:4000])
    assert not mismatched, (
        f"{case}: generated output differs from the goldens; if deliberate, run {UPDATE_HINT}\n"
        + "\n".join(mismatched)
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", CASES)
def test_golden_package_works(case, tmp_path, monkeypatch):
    """The expected package imports and behaves (defaults, flags, --help with % in a doc)."""
    package = f"golden_{case}"
    shutil.copytree(CASES_DIR / case / "expected", tmp_path / package)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module(package)
        config = module.load_config(text="")
        assert config == module.resolved_from_config(module.SECTIONS[""].cls()).config
        assert module.config_from_dict(module.config_to_dict(config)) == config
        assert module.load_config(text=module.dump_yaml(config)) == config
        help_text = module.build_arg_parser().format_help()
        for path in module.FIELDS:
            assert f"--{path}" in help_text
        json.loads((tmp_path / package / "config.schema.json").read_text())
    finally:
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_features_case_behaviour(tmp_path, monkeypatch):
    """Spot checks of the features case: aliases, versioned aliases, shorthand, rules, choices."""
    shutil.copytree(CASES_DIR / "features" / "expected", tmp_path / "golden_features_b")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        m = importlib.import_module("golden_features_b")
        c = m.load_config(text="network:\n  d_model: 32\nsys:\n  dist: true\n  backend: nccl\n")
        assert (c.net.width, c.sys.dist.enabled, c.sys.dist.backend) == (32, True, "nccl")
        assert m.load_config(text="loop:\n  seed: 3\n").seed == 3
        with pytest.raises(m.ConfigError, match="removed in version 2"):
            m.load_config(text="net:\n  dim_old: 32\n")
        with pytest.raises(m.ConfigError, match="relu needs a temperature"):
            m.load_config(text="net:\n  act: relu\n")
        with pytest.raises(m.ConfigError, match="must be one of"):
            m.load_config(text="net:\n  heads: 3\n")
        assert c.loop.decay_steps == 200  # derived: loop.steps * 2
        assert m.load_config(text="loop:\n  steps: 70\n").loop.decay_steps == 140
        assert m.load_config(text="loop:\n  decay_steps: 5\n").loop.decay_steps == 5
        with pytest.raises(m.ConfigError, match=r"must be >= 1.*derived: loop.steps \* 2"):
            m.load_config(text="loop:\n  steps: 0\n  milestones: []\n")
        assert m.load_config(text="net:\n  hidden_size: 16\n").net.width == 16  # the hf name loads
        assert m.HF_NAMES == {"net.width": "hidden_size"}
        assert (
            m.PATH.loop.decay_steps == "loop.decay_steps" and m.PATH.sys.dist.SECTION == "sys.dist"
        )
        assert m.CONSTANTS["loop.resume"].LATEST == "latest"
        assert "net.heads" not in m.CONSTANTS  # int choices get no string constants
        assert m.FIELDS["net.heads"].policy == "must_match"
        assert m.FIELDS["seed"].policy == "from_checkpoint"
    finally:
        for name in [n for n in sys.modules if n.startswith("golden_features_b")]:
            del sys.modules[name]


def test_render_is_deterministic():
    first = render_repo_spec()
    second = render(REPO / "spec" / "config.yaml", spec_name="spec/config.yaml")
    assert list(first) == list(second)
    for name in first:
        assert first[name].encode() == second[name].encode(), name


def test_render_does_not_depend_on_the_spec_path(tmp_path):
    copy = tmp_path / "elsewhere" / "config.yaml"
    copy.parent.mkdir()
    shutil.copy(REPO / "spec" / "config.yaml", copy)
    assert render(copy, spec_name="spec/config.yaml") == render_repo_spec()


GENERATED_FILES = {
    "__init__.py",
    "config.py",
    "names.py",
    "parser.py",
    "CONFIG.md",
    "config.schema.json",
    "completion.bash",
    "completion.zsh",
    "completion.fish",
}
DOC_FILES = {"config.py", "CONFIG.md", "config.schema.json"}


def test_every_generated_file_has_the_header():
    files = sorted(p for p in (REPO / "generated").iterdir() if p.is_file())
    assert {p.name for p in files} == GENERATED_FILES
    for path in files:
        head = path.read_text().splitlines()[:3]
        if path.suffix == ".json":
            head = [json.loads(path.read_text())["$comment"]]
        text = "\n".join(head)
        assert "spec/config.yaml" in text and "codegen/generate.py" in text, path
        assert "Do not edit" in text, path


@pytest.mark.parametrize("case", CASES)
def test_golden_headers_name_the_case_spec(case):
    for name, text in render_case(case).items():
        assert f"{case}/spec.yaml" in text and "Do not edit" in text, name
        assert str(REPO) not in text, f"{name} leaks an absolute path"


def test_a_doc_only_spec_edit_changes_only_the_files_with_docs():
    spec = (REPO / "spec" / "config.yaml").read_text()
    edited = spec.replace("doc: Peak learning rate", "doc: The peak learning rate", 1)
    assert edited != spec
    before = render_repo_spec()
    after = render(REPO / "spec" / "config.yaml", spec_text=edited, spec_name="spec/config.yaml")
    changed = {name for name in before if before[name] != after[name]}
    assert changed == DOC_FILES


def test_generated_code_refuses_another_engine_version():
    code = (
        "import runtime.configlib as engine; engine.ENGINE_VERSION += 1\n"
        "try:\n    import generated\nexcept engine.EngineMismatch as error:\n    print(error)\n"
        "else:\n    raise SystemExit('a mismatched engine was accepted')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "make generate" in result.stdout and "version" in result.stdout


def test_generated_package_imports_without_torch():
    code = "import generated, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
