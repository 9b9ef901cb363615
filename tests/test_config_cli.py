"""`python -m runtime config validate | show | migrate`: exit codes, locations, round trips."""

import re
import subprocess
import sys
import warnings

import pytest

from generated import ConfigAliasWarning, load_config
from helpers import REPO
from runtime.cli import config as config_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
CONFIG_IDS = [p.name for p in CONFIGS]


def run_module(*argv):
    return subprocess.run(
        [sys.executable, "-m", "runtime", "config", *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def run_main(capsys, *argv):
    with warnings.catch_warnings(record=True):  # main() sets a warnings filter; keep it inside
        code = config_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # configs name their base files relative to themselves, outputs to cwd


def test_there_are_example_configs():
    assert {"tiny.yaml", "deepseek_v3.yaml", "legacy_deepseek3.yaml"} <= set(CONFIG_IDS)


def test_validate_every_example_config_exits_0():
    result = run_module("validate", *[p.relative_to(REPO) for p in CONFIGS])
    assert result.returncode == 0, result.stderr
    for path in CONFIGS:
        assert f"{path.relative_to(REPO)}: ok" in result.stdout
    # The legacy file's old names are reported as warnings, not errors.
    assert "warning:" in result.stderr and "'data.dataset_name'" in result.stderr


def test_validate_bad_file_exits_2_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ntraining:\n  batch_size: 0\n  nope: 3\n")
    result = run_module("validate", REPO / "configs" / "tiny.yaml", bad)
    assert result.returncode == 2
    assert f"{bad}:3: training.batch_size: must be >= 1" in result.stderr
    assert f"{bad}:4: training.nope: unknown key" in result.stderr
    assert "tiny.yaml: ok" in result.stdout


def test_validate_missing_file_exits_2(tmp_path, capsys):
    code, _, err = run_main(capsys, "validate", tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml" in err and "cannot read" in err


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_show_round_trips(path, capsys):
    code, out, _ = run_main(capsys, "show", path.relative_to(REPO))
    assert code == 0
    reloaded = load_config(text=out, filename="<show>")
    assert reloaded == load_config(path)
    # Canonical output: loading it raises no old-name warnings.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(text=out)
    assert not [w for w in caught if issubclass(w.category, ConfigAliasWarning)]


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_show_with_flags_round_trips(path, capsys):
    flags = [
        "--training.max_iters",
        "7",
        "--optimizer.lr=6e-4",
        "--wandb.tags",
        "[x, y]",
        "--system.distributed",
        "false",
        "--data.path",
        "null",
        "--data.dataset",
        "stdlib",
    ]
    code, out, _ = run_main(capsys, "show", path.relative_to(REPO), *flags)
    assert code == 0
    expected = load_config(path, argv=flags)
    assert load_config(text=out) == expected
    assert (expected.training.max_iters, expected.optimizer.lr) == (7, 6e-4)
    assert expected.wandb.tags == ["x", "y"] and expected.system.distributed.enabled is False


def test_show_via_the_module_matches(tmp_path):
    result = run_module("show", "configs/tiny.yaml", "--training.batch_size=3")
    assert result.returncode == 0, result.stderr
    assert load_config(text=result.stdout) == load_config(
        REPO / "configs" / "tiny.yaml", argv=["--training.batch_size", "3"]
    )


def test_show_bad_flag_exits_2(capsys):
    code, _, err = run_main(capsys, "show", "configs/tiny.yaml", "--training.batch_sise", "3")
    assert code == 2 and "did you mean --training.batch_size?" in err


def test_migrate_legacy_file(capsys, tmp_path):
    legacy = REPO / "configs" / "legacy_deepseek3.yaml"
    code, out, _ = run_main(capsys, "migrate", "configs/legacy_deepseek3.yaml")
    assert code == 0
    migrated = tmp_path / "migrated.yaml"
    migrated.write_text(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(migrated)
    assert not [w for w in caught if issubclass(w.category, ConfigAliasWarning)], [
        str(w.message) for w in caught
    ]
    assert config == load_config(legacy)
    keys = set(re.findall(r"^\s*([A-Za-z_]+):", out, flags=re.MULTILINE))
    for old in (
        "dataset_name",
        "torch_dtype",
        "use_wandb",
        "wandb_project",
        "wandb_run_name",
        "moe_training",
        "mtp_training",
        "lr_schedule",
        "learning_rate",
        "block_size",
        "hidden_size",
        "loss_weight",
        "n_activated_experts",
        "load_balancing_loss_weight",
    ):
        assert old not in keys, f"{old} survived migration"
    assert {"moe", "mtp", "schedule", "evaluator", "dataset", "dtype", "enabled"} <= keys


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_migrate_keeps_every_config_equal(path, capsys, tmp_path):
    code, out, _ = run_main(capsys, "migrate", path.relative_to(REPO))
    assert code == 0
    migrated = path.parent / f".migrated_{path.name}"  # next to it, so `base:` still resolves
    try:
        migrated.write_text(out)
        assert load_config(migrated) == load_config(path)
    finally:
        migrated.unlink()


def test_migrate_via_the_module():
    result = run_module("migrate", "configs/legacy_deepseek3.yaml")
    assert result.returncode == 0, result.stderr
    assert "dataset_name" not in result.stdout and "dataset: stdlib" in result.stdout


def test_migrate_bad_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  nope: 1\n")
    code, _, err = run_main(capsys, "migrate", bad)
    assert code == 2 and f"{bad}:2" in err


def test_config_cli_does_not_import_torch():
    code = (
        "import sys, runtime.cli.config, runtime.__main__; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "runtime",
            "config",
            "validate",
            "configs/tiny.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert "| torch" not in result.stderr


def test_migrate_refuses_an_alias_and_its_key_with_different_values():
    from generated import ConfigError, migrate_text

    with pytest.raises(ConfigError, match="given twice with different values"):
        migrate_text("data:\n  dataset: stdlib\n  dataset_name: text_dir\n", "x.yaml")
    # The same value twice is fine and collapses to the canonical key.
    assert "dataset_name" not in migrate_text("data:\n  dataset: stdlib\n  dataset_name: stdlib\n")
