"""Config input: bounded cost for any document, YAML semantics, one message format
and exit codes, command lines in any order. The hostile documents run in a subprocess that
reports its own time and peak memory."""

import subprocess
import sys
import warnings

import pytest

from bench.hostile_configs import MEMORY_LIMIT_MB, TIME_LIMIT_S, measure, write_hostile_documents
from generated import ConfigError, load_config, resolve
from helpers import ENV, REPO
from runtime.cli import console
from runtime.configlib import MAX_SHOWN_PROBLEMS


def test_hostile_documents_cost_bounded_time_and_memory(tmp_path):
    for name, (path, expected) in write_hostile_documents(tmp_path).items():
        seconds, peak_mb, outcome = measure(path)
        assert expected in outcome, (name, outcome[:300])
        assert seconds <= TIME_LIMIT_S, f"{name}: {seconds:.2f} s"
        assert peak_mb <= MEMORY_LIMIT_MB, f"{name}: {peak_mb:.0f} MB"


def test_problems_are_capped_with_a_count_of_the_rest(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("".join(f"k{i}: 1\n" for i in range(200)))
    with pytest.raises(ConfigError) as error:
        resolve(path)
    assert len(error.value.problems) == MAX_SHOWN_PROBLEMS and error.value.count == 200
    assert f"... and {200 - MAX_SHOWN_PROBLEMS} more" in str(error.value)


def test_a_base_file_reached_twice_applies_once_where_it_wins(tmp_path):
    (tmp_path / "common.yaml").write_text("seed: 1\ntraining:\n  max_iters: 7\n")
    (tmp_path / "mid.yaml").write_text("base: common.yaml\nseed: 2\n")
    top = tmp_path / "top.yaml"
    top.write_text("base: [common.yaml, mid.yaml, common.yaml]\n")
    config = load_config(top)
    assert config.seed == 1 and config.training.max_iters == 7  # the later common.yaml wins


# --- YAML semantics -----------------------------------------------------------------------


def problem_of(text=None, **kwargs):
    with pytest.raises(ConfigError) as error:
        resolve(text=text, **kwargs)
    return error.value.problems[0]


def test_merge_keys_override_as_yaml_defines():
    config = load_config(text="training:\n  <<: {max_iters: 5, batch_size: 3}\n  max_iters: 9\n")
    assert (config.training.max_iters, config.training.batch_size) == (9, 3)
    problem = problem_of("training:\n  max_iters: 5\n  max_iters: 9\n")
    assert problem.path == "training.max_iters" and "duplicate key 'max_iters'" in problem.message


def test_key_errors_name_the_key_path():
    problem = problem_of("model:\n  1: 2\n")
    assert problem.path == "model" and "keys must be strings" in problem.message


def test_yaml_1_1_numbers_are_refused_saying_what_was_read():
    problem = problem_of("training:\n  max_iters: 017\n")
    assert "leading zero" in problem.message and "octal" in problem.message
    problem = problem_of("training:\n  max_iters: 1:00\n")
    assert problem.path == "training.max_iters" and "base-60" in problem.message


def test_none_means_the_same_in_files_and_flags():
    for given in (dict(text="data:\n  path: None\n"), dict(argv=["--data.path", "None"])):
        problem = problem_of(**given)
        assert problem.path == "data.path" and "write null" in problem.message
    assert load_config(text="data:\n  path: null\n").data.path is None
    assert load_config(argv=["--data.path", "null"]).data.path is None
    assert load_config(argv=["--data.path", "~"]).data.path is None


def test_device_strings_and_list_items_are_validated():
    assert "does not match" in problem_of("system:\n  device: banana\n").message
    assert load_config(argv=["--system.device", "cuda:1"]).system.device.device == "cuda:1"
    assert load_config(argv=["--system.device", "auto"]).system.device.device == "auto"
    assert "each item must be >= 1" in problem_of("schedule:\n  phase_steps: [-5]\n").message


def test_an_old_name_is_validated_like_its_canonical_key_in_either_order():
    for text in (
        "wandb:\n  enabled: true\n  use_wandb: 1\n",
        "wandb:\n  use_wandb: 1\n  enabled: true\n",
    ):
        problem = problem_of(text)
        assert problem.path == "wandb.enabled" and "expected a boolean" in problem.message, text
    assert load_config(text="wandb:\n  enabled: true\n  use_wandb: true\n").wandb.enabled


# --- command lines --------------------------------------------------------------------------


def run(*argv):
    return subprocess.run(
        [sys.executable, "-m", "runtime", *map(str, argv)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=300,
    )


def test_flags_may_come_before_the_file_and_help_anywhere():
    shown = run("config", "show", "--training.max_iters", "5", "configs/tiny.yaml")
    assert shown.returncode == 0 and "max_iters: 5" in shown.stdout
    helped = run("train", "configs/tiny.yaml", "--help")
    assert helped.returncode == 0 and "--training.max_iters" in helped.stdout


def test_old_section_names_and_comma_lists_work_as_flags():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = load_config(
            argv=[
                "--lr_schedule.min_lr",
                "1e-5",
                "--wandb.tags",
                "a,b",
                "--schedule.phase_steps",
                "3,5",
                "--schedule.phase_names",
                "b,c",
            ]
        )
    assert config.schedule.min_lr == 1e-5 and config.wandb.tags == ["a", "b"]
    assert config.schedule.phase_steps == [3, 5]
    assert load_config(argv=["--wandb.tags", "[c, d]"]).wandb.tags == ["c", "d"]


def test_a_bool_flag_alone_means_true():
    assert load_config(argv=["--overwrite", "--seed", "3"]).overwrite is True


def test_usage_lists_every_command_and_the_exit_codes():
    usage = run("--help").stdout
    for command in ("config", "train", "export", "sample", "explain", "diff"):
        assert command in usage
    assert "2   bad input" in usage


@pytest.mark.slow
def test_one_message_format_and_exit_code_for_user_mistakes(tmp_path):
    legacy = run("config", "show", "configs/legacy_deepseek3.yaml")
    assert legacy.returncode == 0 and legacy.stderr.startswith("config: warning: ")
    assert "config_cli.py" not in legacy.stderr  # not Python's raw warning format
    for argv, prog in (
        (("config", "migrate", tmp_path / "missing.yaml"), "config"),
        (("config", "migrate", tmp_path), "config"),
        (("config", "validate", tmp_path / "missing.yaml"), "config"),
        (("train", "configs/tiny.yaml", "--training.nope", "1"), "train"),
    ):
        result = run(*argv)
        assert result.returncode == console.EXIT_USAGE, (argv, result.stderr)
        assert result.stderr.startswith(f"{prog}: error: ") and "Traceback" not in result.stderr, (
            argv
        )
    missing = run("sample", tmp_path / "missing.pt")
    assert missing.returncode == console.EXIT_FAILURE and missing.stderr.startswith(
        "sample: error: "
    )
    assert "Traceback" not in missing.stderr


def test_wandb_without_a_login_is_one_clear_error(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")
    from generated.config import WandbConfig
    from runtime.components.wandb_logger import WandbLogger, WandbUnavailable

    def refuse(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(WandbUnavailable, match="No API key configured.*WANDB_MODE=offline"):
        WandbLogger(WandbConfig(enabled=True), out_dir=str(tmp_path), config_dict={}).start()
