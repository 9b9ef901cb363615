"""The runtime's architecture: import-linter's contracts (pyproject.toml [tool.importlinter]) hold
on the tree and catch what they are meant to catch, and no module grows past 600 lines.

The planted imports go into a copy of runtime/, generated/ and pyproject.toml, linted with that
copy as the working directory (import-linter puts it first on sys.path, before the editable
install of the real tree). Every case that must fail names the planted import in its report,
so a linter that read the real tree instead would fail these tests, not pass them."""

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from helpers import ENV, PYTHON, REPO

LINT_IMPORTS = Path(PYTHON).parent / "lint-imports"
MAX_MODULE_LINES = 600
KEPT = "Contracts: 2 kept, 0 broken."


def lint(root):
    """lint-imports of the tree at `root` (its pyproject.toml, its packages): (exit code, report)."""
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} is missing: install the test extra"
    proc = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=root,
        env=dict(ENV, PYTHONPATH=str(root)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def tree(tmp_path):
    """A copy of the packages import-linter checks, with the contracts."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("runtime", "generated"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def plant(root, module, code):
    """Append `code` to a module of the copy."""
    path = root / module
    assert path.is_file(), path
    with open(path, "a") as f:
        f.write("\n\n" + textwrap.dedent(code))


LAZY_UPWARD = """\
    def _planted():
        from runtime.trainer import trainer

        return trainer
    """


def test_the_contracts_hold_on_the_tree():
    code, report = lint(REPO)
    assert code == 0 and KEPT in report, report


def test_a_lazy_import_of_a_higher_layer_breaks_the_layers(tree):
    plant(tree, "runtime/utils/files.py", LAZY_UPWARD)
    code, report = lint(tree)
    assert code != 0, report
    assert "runtime.utils is not allowed to import runtime.trainer" in report, report
    assert "runtime.utils.files -> runtime.trainer.trainer" in report, report


def test_a_lazy_import_that_makes_a_cycle_in_a_package_is_caught(tree):
    # runtime.checkpoint.manager imports runtime.checkpoint.format at the top
    plant(
        tree,
        "runtime/checkpoint/format.py",
        """\
        def _planted():
            from runtime.checkpoint import manager

            return manager
        """,
    )
    code, report = lint(tree)
    assert code != 0, report
    assert "No cycles are allowed in runtime.checkpoint" in report, report
    assert ".format -> .manager" in report, report
    assert "runtime.utils is not allowed" not in report  # the layers still hold


def test_an_import_under_type_checking_is_exempt(tree):
    # the same upward import, first as a lazy import (caught: this is the copy being linted) ...
    original = (tree / "runtime/utils/files.py").read_text()
    plant(tree, "runtime/utils/files.py", LAZY_UPWARD)
    code, report = lint(tree)
    assert code != 0 and "runtime.utils.files -> runtime.trainer.trainer" in report, report
    # ... then under `if TYPE_CHECKING:` only: exempt
    (tree / "runtime/utils/files.py").write_text(original)
    plant(
        tree,
        "runtime/utils/files.py",
        """\
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from runtime.trainer import trainer  # noqa: F401
        """,
    )
    code, report = lint(tree)
    assert code == 0 and KEPT in report, report


def test_no_runtime_module_is_over_600_lines():
    modules = sorted((REPO / "runtime").rglob("*.py"))
    assert len(modules) > 50  # the packages are there
    lengths = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in modules}
    too_long = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"over {MAX_MODULE_LINES} lines: {too_long}"
