"""Hostile config documents and a fresh-process measurement of what validating one costs.

Shared by `make bench` (the worst case is reported) and tests/test_config_input.py (each must stay
within the bounds runtime/configlib promises: 2 s and 300 MB)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from runtime.configlib.yamllines import MAX_DOCUMENT_BYTES

REPO = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 2.0
MEMORY_LIMIT_MB = 300

_MEASURE = textwrap.dedent(
    """
    import json, sys, time
    import generated
    start = time.perf_counter()
    try:
        generated.resolve(sys.argv[1])
        outcome = "ok"
    except generated.ConfigError as error:
        outcome = str(error)
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
    status = open("/proc/self/status").read()
    peak_mb = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "outcome": outcome}))
    """
)


def measure(path):
    """(seconds, peak MB of the whole process, error text or 'ok') of validating `path` in a
    fresh interpreter (the time excludes the interpreter start and imports)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["seconds"], report["peak_mb"], report["outcome"]


def alias_bomb(levels=9, width=9):
    """A few hundred bytes whose YAML aliases expand to width**levels values."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append(f"wandb:\n  tags: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def write_hostile_documents(folder):
    """{name: (path, text expected in the outcome)} of hostile documents written to `folder`."""
    folder = Path(folder)
    bomb = folder / "bomb.yaml"
    bomb.write_text(alias_bomb())
    unknown = folder / "unknown.yaml"
    lines, size = [], 0
    while size < MAX_DOCUMENT_BYTES - 100:
        lines.append(f"k{len(lines)}: 1")
        size += len(lines[-1]) + 1
    unknown.write_text("\n".join(lines) + "\n")
    too_big = folder / "big.yaml"
    too_big.write_text("#" * (MAX_DOCUMENT_BYTES + 1) + "\nseed: 1\n")
    fan = folder / "fan"
    fan.mkdir(exist_ok=True)
    files, repeats = 8, 10
    for index in range(files):
        bases = [f"f{index + 1}.yaml"] * repeats if index + 1 < files else []
        body = f"base: {json.dumps(bases)}\n" if bases else ""
        (fan / f"f{index}.yaml").write_text(body + f"seed: {index}\n")
    deep = folder / "deep.yaml"
    deep.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    return {
        "alias bomb (9 levels of 9 aliases)": (bomb, "expands to more than"),
        "unknown keys up to the size limit": (unknown, "more"),
        "a file over the size limit": (too_big, "limited to"),
        "base files listed 10 times each, 8 deep": (fan / "f0.yaml", "ok"),
        "lists nested 5000 deep": (deep, "config problem"),
    }


def worst_case(folder):
    """{name: (seconds, peak_mb)} of every hostile document, and the worst of each."""
    results = {
        name: measure(path)[:2] for name, (path, _) in write_hostile_documents(folder).items()
    }
    return results, max(s for s, _ in results.values()), max(mb for _, mb in results.values())
