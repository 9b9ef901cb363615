"""`make check` catches drift between spec/ and generated/; `make generate` fixes it.

Each test works on a copy of the config layer in a temporary folder. The copy gets a private
`.venv` whose bin/ and lib/ link to the repo's venv and whose setup stamp matches
requirements.txt, so `make` reuses it and never runs pip (checked).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

COPIED = [
    "spec",
    "codegen",
    "generated",
    "configs",
    "Makefile",
    "requirements.txt",
    "pyproject.toml",
    "runtime",
]
GENERATED = ["__init__.py", "config.py", "names.py", "parser.py", "CONFIG.md", "config.schema.json"]
COMPLETION = ["completion.bash", "completion.zsh", "completion.fish"]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _venv_shim(target):
    """A venv at target/.venv that borrows the repo's interpreter and packages."""
    real = Path(sys.prefix)
    venv = target / ".venv"
    venv.mkdir()
    for name in ("bin", "lib", "lib64", "include"):
        if (real / name).exists():
            (venv / name).symlink_to(real / name)
    shutil.copy(real / "pyvenv.cfg", venv / "pyvenv.cfg")
    requirements = target / "requirements.txt"
    stamp = venv / f".installed-{hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]}"
    stamp.touch()
    old = stamp.stat().st_mtime - 60
    os.utime(requirements, (old, old))  # the stamp is newer: nothing to install


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)
    _venv_shim(root)
    return root


def make(root, *targets):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(["make", *targets], cwd=root, capture_output=True, text=True, env=env)
    output = result.stdout + result.stderr
    assert "pip install" not in output and "python3 -m venv" not in output, output
    return result.returncode, output


def generated_mtimes(root):
    return {p.name: p.stat().st_mtime_ns for p in (root / "generated").iterdir() if p.is_file()}


def test_make_uses_the_existing_venv(tree):
    dry = subprocess.run(["make", "-n", "check"], cwd=tree, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "pip" not in dry.stdout and "python3 -m venv" not in dry.stdout
    assert "codegen.generate --check" in dry.stdout


@pytest.mark.slow
def test_check_passes_on_a_pristine_copy(tree):
    code, output = make(tree, "check")
    assert code == 0, output
    assert "up to date" in output
    assert "configs/tiny.yaml: ok" in output


@pytest.mark.slow
def test_editing_a_default_is_caught_then_fixed_everywhere(tree):
    spec = tree / "spec" / "config.yaml"
    text = spec.read_text()
    pattern = re.compile(
        r"(      - name: max_iters\n        type: steps\n(?:        .*\n)*?        default: )600\n"
    )
    assert len(pattern.findall(text)) == 1, "training.max_iters default not found in the spec"
    spec.write_text(pattern.sub(r"\g<1>777\n", text))

    code, output = make(tree, "check")
    assert code != 0
    assert "+    max_iters: int = 777" in output  # a diff
    assert "make generate" in output  # and the fix

    code, output = make(tree, "generate")
    assert code == 0, output
    code, output = make(tree, "check")
    assert code == 0, output

    generated = tree / "generated"
    assert "    max_iters: int = 777\n" in (generated / "config.py").read_text()
    assert re.search(
        r"^\| `training.max_iters` \| `steps` \| `777` \|",
        (generated / "CONFIG.md").read_text(),
        re.M,
    )
    schema = json.loads((generated / "config.schema.json").read_text())
    assert schema["properties"]["training"]["properties"]["max_iters"]["default"] == 777
    probe = (
        "from generated import build_arg_parser, load_config\n"
        "assert load_config(text='').training.max_iters == 777\n"
        "help = ' '.join(build_arg_parser().format_help().split())\n"
        "entry = help.split('--training.max_iters STEPS ', 1)[1].split(' --', 1)[0]\n"
        "assert 'Default: 777.' in entry, entry\n"
    )
    result = subprocess.run(
        [str(tree / ".venv" / "bin" / "python"), "-c", probe],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["config.py", "CONFIG.md", "config.schema.json"])
def test_hand_edit_of_a_generated_file_is_caught(tree, name):
    path = tree / "generated" / name
    path.write_text(path.read_text().replace("Sequences per micro-batch", "Sequences per batch", 1))
    code, output = make(tree, "check")
    assert code != 0
    assert name in output and "make generate" in output


@pytest.mark.parametrize("name", COMPLETION)
def test_hand_edit_of_a_completion_script_is_caught(tree, name):
    path = tree / "generated" / name
    text = path.read_text()
    assert "training.max_iters" in text
    path.write_text(text.replace("training.max_iters", "training.max_iter", 1))
    code, output = make(tree, "check")
    assert code != 0
    assert name in output and "make generate" in output


@pytest.mark.slow
def test_a_new_choice_or_command_leaves_the_completion_stale_until_generated(tree):
    spec = tree / "spec" / "config.yaml"
    text = spec.read_text()
    assert text.count("choices: [stop, skip]") == 1
    spec.write_text(text.replace("choices: [stop, skip]", "choices: [stop, skip, pause]"))
    main = tree / "runtime" / "cli" / "main.py"
    source = main.read_text()
    assert source.count('    "completion": "runtime.cli.completion",\n') == 1
    main.write_text(
        source.replace(
            '    "completion": "runtime.cli.completion",\n',
            '    "completion": "runtime.cli.completion",\n    "frobnicate": "runtime.cli.plan",\n',
        )
    )
    code, output = make(tree, "check")
    assert code != 0 and "make generate" in output
    for name in COMPLETION:
        assert f"generated/{name} (from the spec)" in output, name
    assert "stop skip pause" in output and "frobnicate" in output
    code, output = make(tree, "generate")
    assert code == 0, output
    bash = (tree / "generated" / "completion.bash").read_text()
    assert '"stop skip pause"' in bash and " frobnicate" in bash


def test_stray_and_missing_generated_files_are_caught(tree):
    (tree / "generated" / "extra.py").write_text("# not from the spec\n")
    code, output = make(tree, "check")
    assert code != 0 and "extra.py" in output and "not produced by the generator" in output
    (tree / "generated" / "extra.py").unlink()
    (tree / "generated" / "CONFIG.md").unlink()
    code, output = make(tree, "check")
    assert code != 0 and "CONFIG.md" in output


def test_generate_on_an_unchanged_tree_rewrites_nothing(tree):
    before = generated_mtimes(tree)
    code, output = make(tree, "generate")
    assert code == 0, output
    assert "already up to date" in output
    assert generated_mtimes(tree) == before
