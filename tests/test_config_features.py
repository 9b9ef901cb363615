"""Config features beyond parsing: provenance (explain), composition, diff, minimal dump,
checkpoint policies, spec versions and shape-aware messages. Goldens live in tests/data/features/."""

import importlib
import os
import sys
from pathlib import Path

import pytest

import generated as g
from codegen.generate import render, write
from helpers import REPO
from runtime.cli import config as config_cli

FEATURES = Path("tests/data/features")
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def run_cli(capsys, *argv):
    code = config_cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_golden(name, text):
    path = REPO / FEATURES / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (
        f"{name} differs from its golden; if intended, rerun with UPDATE_GOLDEN=1"
    )


def test_explain_golden(capsys):
    code, out, _ = run_cli(
        capsys,
        "explain",
        str(FEATURES / "child.yaml"),
        "training.max_iters",
        "training.batch_size",
        "evaluator.eval_iters",
        "training.eval_iters",
        "--training.max_iters",
        "40",
        "seed",
    )
    assert code == 0
    assert_golden("explain.txt", out)
    # The record behind it: three layers for max_iters, newest last.
    resolved = g.resolve(FEATURES / "child.yaml", argv=["--training.max_iters", "40"])
    assert resolved.sources["training.max_iters"].kind == "cli"
    assert [value for value, _ in resolved.overridden["training.max_iters"]] == [600, 20, 30]


def test_explain_unknown_key_fails(capsys):
    code, _, err = run_cli(capsys, "explain", str(FEATURES / "child.yaml"), "training.nope")
    assert code == 2 and "training.nope" in err


def test_composition_later_files_and_flags_win():
    config = g.load_config(FEATURES / "child.yaml", argv=["--optimizer.lr", "0.003"])
    assert config.out_dir == "out/a"  # from the base
    assert config.training.batch_size == 4  # from the base
    assert config.training.max_iters == 30  # the file overrides its base
    assert config.optimizer.lr == 0.003  # the flag overrides both
    assert config.evaluator.eval_iters == 5


def test_composition_cycle_and_missing_base_are_errors():
    with pytest.raises(g.ConfigError) as cycle:
        g.load_config(FEATURES / "cycle_1.yaml")
    assert "cycle" in str(cycle.value) and "cycle_2.yaml" in str(cycle.value)
    with pytest.raises(g.ConfigError) as missing:
        g.load_config(FEATURES / "missing_base.yaml")
    assert "nowhere.yaml" in str(missing.value) and "missing_base.yaml:1" in str(missing.value)


def test_configs_use_composition():
    resolved = g.resolve("configs/tiny_compiled.yaml")
    assert resolved.sources["model.dim"].file.endswith("tiny.yaml")
    assert resolved.config.system.compile.compile is True


def test_diff_golden(capsys):
    code, out, _ = run_cli(capsys, "diff", "configs/tiny.yaml", "configs/tiny_compiled.yaml")
    assert code == 0
    assert_golden("diff.txt", out)


def test_show_changed_lists_only_non_defaults(capsys):
    code, out, _ = run_cli(capsys, "show", "--changed", str(FEATURES / "child.yaml"))
    assert code == 0
    assert_golden("show_changed.txt", out)
    # The minimal dump loads back to the same config.
    assert g.load_config(text=out) == g.load_config(FEATURES / "child.yaml")


def test_shape_aware_messages_golden(capsys):
    code, _, err = run_cli(capsys, "validate", str(FEATURES / "shapes.yaml"))
    assert code == 2
    assert_golden("shapes_messages.txt", err)


def test_policy_must_match_names_field_and_both_values():
    saved = g.to_saved_dict(g.load_config("configs/tiny.yaml"))
    resolved = g.resolve("configs/tiny.yaml", argv=["--model.n_routed_experts", "4"])
    with pytest.raises(g.ConfigError) as error:
        g.reconcile_with_checkpoint(resolved, saved, "ckpt_0000010.pt")
    message = str(error.value)
    assert (
        "model.n_routed_experts" in message
        and "it has 8" in message
        and "this run has 4" in message
    )
    assert "ckpt_0000010.pt" in message


def test_policy_from_checkpoint_unless_explicit():
    saved = g.to_saved_dict(g.load_config(text="training: {batch_size: 3}"))
    # Not given by this run: the checkpoint's value wins.
    config, notes = g.reconcile_with_checkpoint(g.resolve(text="training: {max_iters: 9}"), saved)
    assert config.config.training.batch_size == 3 and any("batch_size" in n for n in notes)
    # Given explicitly: this run's value wins.
    config, _ = g.reconcile_with_checkpoint(g.resolve(argv=["--training.batch_size", "5"]), saved)
    assert config.config.training.batch_size == 5


def test_policy_overridable_new_value_wins_with_a_note():
    saved = g.to_saved_dict(g.load_config(text="training: {max_iters: 10}"))
    config, notes = g.reconcile_with_checkpoint(g.resolve(text="training: {max_iters: 20}"), saved)
    assert config.config.training.max_iters == 20
    assert any("training.max_iters" in n and "20" in n and "10" in n for n in notes)


def test_docs_show_policies_versions_and_composition():
    doc = (REPO / "generated/CONFIG.md").read_text()
    assert "| `model.dim` | `int` | `128` |" in doc and "| must_match |" in doc
    assert "from_checkpoint" in doc and "overridable" in doc
    assert "**Composition.**" in doc and "**Versions.**" in doc and "spec_version" in doc


def test_saved_config_records_spec_version():
    config = g.load_config("configs/tiny.yaml")
    assert g.to_saved_dict(config)["spec_version"] == g.SPEC_VERSION
    assert g.dump_yaml(config).startswith(f"spec_version: {g.SPEC_VERSION}\n")


VERSIONED_SPEC = """
version: 3
root:
  class: Config
  doc: Root.
  fields:
    - name: seed
      type: int
      default: 1
      doc: Seed.
sections:
  - name: train
    class: TrainConfig
    doc: Training.
    fields:
      - name: steps
        type: int
        default: 10
        doc: Steps.
        aliases:
          - {name: iters, since: 2, removed: 3}
          - {name: num_steps, since: 3}
"""


@pytest.fixture()
def versioned(tmp_path, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(VERSIONED_SPEC)
    write(render(spec, spec_name="spec.yaml"), tmp_path / "versioned_pkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("versioned_pkg")
    yield module
    for name in [n for n in sys.modules if n.startswith("versioned_pkg")]:
        del sys.modules[name]


def test_removed_name_is_an_error_that_says_how_to_migrate(versioned):
    with pytest.raises(versioned.ConfigError) as error:
        versioned.load_config(text="train: {iters: 5}")
    message = str(error.value)
    assert "renamed to 'train.steps' in spec version 2 and removed in version 3" in message
    assert "config migrate" in message


def test_older_version_is_upgraded_through_renames(versioned):
    config = versioned.load_config(text="spec_version: 2\ntrain: {iters: 5}")
    assert config.train.steps == 5
    assert versioned.config_from_dict({"spec_version": 2, "train": {"iters": 7}}).train.steps == 7


def test_newer_version_is_refused(versioned):
    with pytest.raises(versioned.ConfigError, match="newer than this code's version 3"):
        versioned.load_config(text="spec_version: 4\ntrain: {steps: 5}")


def test_migrate_rewrites_removed_names_and_records_version(versioned):
    text = versioned.migrate_text("train: {iters: 5}\n")
    assert text == "spec_version: 3\ntrain:\n  steps: 5\n"
    assert versioned.load_config(text=text).train.steps == 5


def test_docs_record_alias_versions(versioned, tmp_path):
    doc = (tmp_path / "versioned_pkg" / "CONFIG.md").read_text()
    assert "`train.iters` (v2, removed in v3)" in doc and "`train.num_steps` (v3)" in doc
