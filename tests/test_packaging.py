"""Packaging: pyproject declares packages, dependencies, extras and the console script; a wheel
built offline from a copy of the tree holds the packages and the `deepseek-moe` entry point."""

import shutil
import subprocess
import sys
import tomllib
import zipfile

from helpers import REPO
from runtime.cli import main as cli

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_declares_packages_extras_and_script():
    project = PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == [
        "runtime",
        "runtime.*",
        "generated",
        "codegen",
    ]
    assert {"train", "hf", "wandb", "test", "bench"} <= set(project["optional-dependencies"])
    train = project["optional-dependencies"]["train"]
    assert any(r.startswith("torch~=2.13.0") for r in train), (
        "torch must stay within its minor release"
    )
    assert not any(r.startswith("torch") for r in project["dependencies"]), (
        "the config core needs no torch"
    )
    assert project["scripts"]["deepseek-moe"] == "runtime.__main__:main"
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    # make setup installs the tree itself without fetching anything
    assert "--no-deps --no-build-isolation -e ." in (REPO / "Makefile").read_text()


def test_console_script_target_runs(capsys):
    assert cli.main(["--help"]) == 0
    assert "deepseek-moe COMMAND" in capsys.readouterr().out


def test_missing_train_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "runtime.cli.sample", None)  # fails like a missing module
    monkeypatch.setattr(
        cli, "TRAIN_EXTRA_MODULES", cli.TRAIN_EXTRA_MODULES | {"runtime.cli.sample"}
    )
    assert cli.main(["sample", "x"]) == 1
    assert "pip install -e '.[train]'" in capsys.readouterr().err


def test_wheel_builds_offline_with_entry_point(tmp_path):
    tree = tmp_path / "src"
    tree.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("runtime", "generated", "codegen"):
        shutil.copytree(REPO / name, tree / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tree / name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(tree),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("deepseek_moe_trainer-0.1.0-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "runtime/__main__.py" in names and "generated/config.schema.json" in names
    assert {f"generated/completion.{shell}" for shell in ("bash", "zsh", "fish")} <= set(names)
    assert "runtime/configlib/engine.py" in names  # the engine generated/ imports
    packages = [p.relative_to(REPO).as_posix() for p in (REPO / "runtime").rglob("__init__.py")]
    assert packages and set(packages) <= set(names)  # every subpackage of runtime/
    assert "codegen/templates/config.py.j2" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "deepseek-moe = runtime.__main__:main" in zipfile.ZipFile(wheel).read(entry).decode()
