"""Each spec error gives a SpecError naming the spec file and the line of the mistake, and
`python -m codegen.generate` on a bad spec exits 1 and writes nothing.

Each bad spec below marks the line the error must point at with `# <-`.
"""

import subprocess
import sys

import pytest

from codegen.spec import SpecError, load_spec
from helpers import REPO

GOOD = """\
version: 1
root:
  class: Config
  doc: Root.
  fields:
    - name: seed
      type: int
      default: 1
      min: 0
      doc: Seed.
sections:
  - name: train
    class: TrainConfig
    doc: Train.
    shorthand: steps
    fields:
      - name: steps
        type: int
        default: 10
        min: 0
        aliases: [iters]
        doc: Steps.
      - name: mode
        type: str
        default: a
        choices: [a, b]
        doc: Mode.
rules:
  - check: train.steps >= seed
    message: enough steps
"""


def edit(old, new):
    assert GOOD.count(old) == 1, old
    return GOOD.replace(old, new)


CASES = {
    "unknown spec attribute": (
        edit("        min: 0\n", "        min: 0\n        colour: red  # <-\n"),
        "unknown spec attribute 'colour'",
    ),
    "default of the wrong type": (
        edit("default: 10", "default: ten  # <-"),
        "default 'ten' does not fit: expected an integer",
    ),
    "default below min": (
        edit("default: 10", "default: -1  # <-"),
        "default -1 does not fit: must be >= 0",
    ),
    "default outside choices": (
        edit("default: a\n", "default: c  # <-\n"),
        "default 'c' does not fit: must be one of 'a', 'b'",
    ),
    "choice of the wrong type": (
        edit("choices: [a, b]", "choices: [a, 3]  # <-"),
        "choice 3 does not fit",
    ),
    "duplicate field name": (
        edit("      - name: mode", "      - name: steps  # <-"),
        "duplicate name 'train.steps'",
    ),
    "alias colliding with a field": (
        edit("      - name: steps\n", "      - name: steps  # <-\n").replace(
            "aliases: [iters]", "aliases: [mode]"
        ),
        "alias 'train.mode' collides with the field or section 'train.mode'",
    ),
    "rule naming a missing field": (
        edit("  - check: train.steps >= seed", "  - check: train.stepz >= seed  # <-"),
        "'train.stepz' names no field of the spec",
    ),
    "rule naming a missing root field": (
        edit("  - check: train.steps >= seed", "  - check: train.steps >= sead  # <-"),
        "'sead' names no field of the spec",
    ),
    "bad type name": (
        edit("type: str", "type: string  # <-"),
        "unknown type 'string'",
    ),
    "shorthand naming no field": (
        edit("shorthand: steps", "shorthand: stepz  # <-"),
        "shorthand 'stepz' is not a field of the section",
    ),
    "disallowed function in a rule": (
        edit("  - check: train.steps >= seed", "  - check: eval('1') == train.steps  # <-"),
        "function 'eval' is not allowed",
    ),
    "method call in a rule": (
        edit(
            "  - check: train.steps >= seed",
            "  - check: len.__self__.__import__('os').getpid() > 0  # <-",
        ),
        "is not allowed",
    ),
    "rule that is not Python": (
        edit("  - check: train.steps >= seed", "  - check: train.steps >=  # <-"),
        "not a Python expression",
    ),
    "missing doc": (
        edit("        doc: Mode.\n", "").replace("      - name: mode", "      - name: mode  # <-"),
        "missing required attribute 'doc'",
    ),
    "bound on a string field": (
        edit("        choices: [a, b]\n", "        choices: [a, b]\n        min: 1  # <-\n"),
        "'min' only applies to number fields (int, float, steps, tokens and their lists)",
    ),
    "YAML syntax error": (
        edit("    doc: Train.\n", "    doc: [Train.\n    shorthand: : x  # <-\n").replace(
            "    shorthand: steps\n", ""
        ),
        "YAML",
    ),
    "duplicate key in the spec": (
        edit("        doc: Steps.\n", "        doc: Steps.\n        doc: Again.  # <-\n"),
        "duplicate key 'doc'",
    ),
}


def marked_line(text):
    lines = [n for n, line in enumerate(text.splitlines(), 1) if "# <-" in line]
    assert len(lines) == 1, "each case marks exactly one line"
    return lines[0]


def test_the_good_spec_loads(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD)
    spec = load_spec(path)
    assert [f.path for f in spec.fields()] == ["seed", "train.steps", "train.mode"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_spec_error_names_file_and_line(case, tmp_path):
    text, expected = CASES[case]
    path = tmp_path / "bad_spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    line = marked_line(text)
    matching = [p for p in raised.value.problems if expected in p]
    assert matching, f"no problem mentions {expected!r}: {raised.value.problems}"
    assert any(p.startswith(f"{path}:{line}: ") for p in matching), (
        f"expected {path}:{line}: ...; got {matching}"
    )
    assert str(raised.value).count(str(path)) == len(raised.value.problems)


def test_every_problem_is_reported_together(tmp_path):
    text = (
        GOOD.replace("type: str", "type: string")
        .replace("default: 10", "default: ten")
        .replace("shorthand: steps", "shorthand: stepz")
        .replace("train.steps >= seed", "train.stepz >= seed")
    )
    path = tmp_path / "bad_spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    problems = raised.value.problems
    for expected in ("unknown type", "default 'ten'", "shorthand 'stepz'", "'train.stepz'"):
        assert any(expected in p for p in problems), (expected, problems)
    assert len({p.split(":")[1] for p in problems}) == 4  # four different lines


@pytest.mark.parametrize("existing", [True, False])
def test_generate_on_a_bad_spec_exits_1_and_writes_nothing(tmp_path, existing):
    text, _ = CASES["default of the wrong type"]
    spec = tmp_path / "bad_spec.yaml"
    spec.write_text(text)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("untouched\n")
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    result = subprocess.run(
        [sys.executable, "-m", "codegen.generate", "--spec", str(spec), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{spec}:{marked_line(text)}:" in result.stderr
    after = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert after == before
    if existing:
        assert (out / "keep.txt").read_text() == "untouched\n"


def test_check_on_a_bad_spec_exits_1(tmp_path):
    text, _ = CASES["bad type name"]
    spec = tmp_path / "bad_spec.yaml"
    spec.write_text(text)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "codegen.generate",
            "--check",
            "--spec",
            str(spec),
            "--out",
            str(REPO / "generated"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "unknown type 'string'" in result.stderr
