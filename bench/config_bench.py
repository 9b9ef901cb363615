"""Config layer against OmegaConf: import cost, load + validate, generator and drift-check time;
the worst case of validating hostile documents (bench/hostile_configs.py)."""

import compileall
import subprocess
import sys
import tempfile
from pathlib import Path

from . import hostile_configs
from .common import Target, interleaved_medians, median_time

REPO = Path(__file__).resolve().parents[1]
FULL_CONFIG = REPO / "configs" / "deepseek_v3.yaml"


def _python(code):
    return lambda: subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def _imports_torch():
    probe = "import sys, generated; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True
    )
    return out.stdout.strip() == "True"


def _for_omegaconf():
    """The full config with its counts written as steps (`14.3T tokens` -> 236882): OmegaConf
    types those fields as int and cannot read the unit; ours reads the file as written (and so
    does the resolving on top)."""
    import yaml

    import generated

    tree = generated.config_to_dict(generated.load_config(FULL_CONFIG))
    path = Path(tempfile.mkdtemp()) / "deepseek_v3_steps.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run(quick=False):
    repeats = 5 if quick else 15
    omegaconf_file = _for_omegaconf()
    # Both sides import from bytecode: pip byte-compiled OmegaConf when it installed it, and Python
    # caches ours on first import unless PYTHONDONTWRITEBYTECODE is set (then every import would
    # compile the sources again, ~15 ms of the import), so compile ours once here the same way.
    compileall.compile_dir(REPO / "generated", quiet=1)
    compileall.compile_dir(REPO / "runtime" / "configlib", quiet=1)
    compileall.compile_file(REPO / "runtime" / "__init__.py", quiet=1)
    # Import cost: a fresh interpreter each time, minus the bare interpreter start.
    times = interleaved_medians(
        {
            "bare": _python("pass"),
            "generated": _python("import generated"),
            "omegaconf": _python("import omegaconf"),
            # PyYAML loads on first use, so also show import plus one full load, beside OmegaConf
            # importing and loading the same file into the same typed structure.
            "generated_first_load": _python(
                f"import generated; generated.load_config({str(FULL_CONFIG)!r})"
            ),
            "omegaconf_first_load": _python(
                "from omegaconf import OmegaConf; import generated; "
                f"OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(generated.Config), OmegaConf.load({str(omegaconf_file)!r})))"
            ),
        },
        repeats,
    )
    ours_import = max(times["generated"] - times["bare"], 1e-4)
    omegaconf_import = max(times["omegaconf"] - times["bare"], 1e-4)

    from omegaconf import OmegaConf

    import generated

    schema = OmegaConf.structured(generated.Config)

    def ours():
        generated.load_config(FULL_CONFIG)

    def omegaconf():
        # The same work: parse the file, merge into the typed structure (type checks), build the
        # dataclasses (range checks in __post_init__), then the spec's cross-field rules.
        merged = OmegaConf.merge(schema, OmegaConf.load(omegaconf_file))
        config = OmegaConf.to_object(merged)
        for rule in generated.RULES:
            if rule.applies is None or rule.applies(config):
                assert rule.holds(config)

    load = interleaved_medians({"ours": ours, "omegaconf": omegaconf}, repeats * 4, warmup=3)

    generate_time = median_time(
        lambda: subprocess.run(
            [sys.executable, "-m", "codegen.generate", "--out", "/tmp/bench_generated"],
            cwd=REPO,
            check=True,
            capture_output=True,
        ),
        3 if quick else 5,
    )
    check_time = median_time(
        lambda: subprocess.run(
            [sys.executable, "-m", "codegen.generate", "--check"],
            cwd=REPO,
            check=False,
            capture_output=True,
        ),
        3 if quick else 5,
    )

    no_torch = not _imports_torch()
    with tempfile.TemporaryDirectory() as folder:
        hostile, worst_s, worst_mb = hostile_configs.worst_case(folder)
    return {
        "targets": [
            Target(
                "config import vs OmegaConf (speed-up)",
                omegaconf_import / ours_import,
                1.5,
                True,
                detail=f"ours {ours_import * 1e3:.1f} ms, omegaconf {omegaconf_import * 1e3:.1f} ms, imports torch: {not no_torch}",
            ),
            Target(
                "config load+validate vs OmegaConf (speed-up)",
                load["omegaconf"] / load["ours"],
                5.0,
                True,
                detail=f"ours {load['ours'] * 1e3:.2f} ms, omegaconf {load['omegaconf'] * 1e3:.2f} ms (configs/deepseek_v3.yaml)",
            ),
            Target(
                "hostile config worst case: validate time",
                worst_s,
                hostile_configs.TIME_LIMIT_S,
                False,
                unit="s",
                detail="worst of " + ", ".join(f"{n}: {t:.3f} s" for n, (t, _) in hostile.items()),
            ),
            Target(
                "hostile config worst case: peak memory",
                worst_mb,
                hostile_configs.MEMORY_LIMIT_MB,
                False,
                unit="MB",
                detail="peak RSS of the validating process, imports included",
            ),
        ],
        "figures": {
            "generated_imports_torch": not no_torch,
            "import_ms": {"generated": ours_import * 1e3, "omegaconf": omegaconf_import * 1e3},
            "import_and_first_load_ms": {
                "generated": (times["generated_first_load"] - times["bare"]) * 1e3,
                "omegaconf": (times["omegaconf_first_load"] - times["bare"]) * 1e3,
            },
            "load_validate_ms": {
                "generated": load["ours"] * 1e3,
                "omegaconf": load["omegaconf"] * 1e3,
            },
            "hostile_configs": {n: {"seconds": t, "peak_mb": mb} for n, (t, mb) in hostile.items()},
            "generate_s": generate_time,
            "drift_check_s": check_time,
        },
    }
