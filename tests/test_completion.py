"""`deepseek-moe completion bash|zsh|fish`: the shell completion scripts generated from the spec
(generated/completion.*). The bash script is driven as bash drives it: sourced, COMP_WORDS /
COMP_CWORD / COMP_LINE / COMP_POINT set, the completion function called, COMPREPLY read."""

import shlex
import shutil
import subprocess

import pytest

from generated import FIELDS, FLAGS
from helpers import ENV, PYTHON, REPO
from runtime.cli import completion as completion_cli
from runtime.cli import config as config_cli
from runtime.cli import main as cli

SCRIPTS = {shell: REPO / "generated" / f"completion.{shell}" for shell in ("bash", "zsh", "fish")}
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def complete(*words):
    """COMPREPLY of the bash completion for a command line whose last word is being completed."""
    line = " ".join(words)
    script = (
        f"source {shlex.quote(str(SCRIPTS['bash']))}\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        f"COMP_LINE={shlex.quote(line)}\n"
        f"COMP_POINT={len(line)}\n"
        '_deepseek_moe\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return sorted(word for word in result.stdout.split("\n") if word)


@needs_bash
def test_commands_and_subcommands():
    assert complete("deepseek-moe", "") == sorted([*cli.COMMANDS, "--help"])
    assert complete("deepseek-moe", "tr") == ["train"]
    assert complete("deepseek-moe", "comp") == ["completion"]
    assert complete("deepseek-moe", "config", "") == sorted([*config_cli.COMMANDS, "--help"])
    assert complete("deepseek-moe", "config", "ex") == ["explain"]
    assert complete("deepseek-moe", "data", "") == ["--help", "inspect", "prepare", "replay"]


@needs_bash
def test_flags_by_prefix_old_names_included():
    assert complete("deepseek-moe", "train", "--model.sco") == [
        "--model.score_func",
        "--model.scoring_func",  # the Hugging Face name, an old name
    ]
    assert complete("deepseek-moe", "train", "--lr_schedule.min") == ["--lr_schedule.min_lr"]
    assert complete("deepseek-moe", "plan", "cfg.yaml", "--model.hidden_s") == [
        "--model.hidden_size"
    ]
    assert complete("deepseek-moe", "config", "show", "x.yaml", "--training.max_i") == [
        "--training.max_iters"
    ]
    every = complete("deepseek-moe", "train", "--")
    assert every == sorted({f"--{flag}" for flag in FLAGS} | {"--help"})


@needs_bash
def test_choices_special_values_and_booleans_after_their_flag():
    assert complete("deepseek-moe", "train", "--model.score_func", "") == ["sigmoid", "softmax"]
    assert complete("deepseek-moe", "train", "--model.scoring_func", "so") == ["softmax"]
    assert complete("deepseek-moe", "train", "--checkpointer.resume_from", "") == ["latest"]
    assert complete("deepseek-moe", "train", "--overwrite", "") == ["false", "true"]
    assert complete("deepseek-moe", "train", "--overwrite", "--ov") == ["--overwrite"]
    # --flag=value: split at = (bash's default COMP_WORDBREAKS) and as one word
    assert complete("deepseek-moe", "train", "--schedule.schedule_type", "=", "w") == ["wsd"]
    assert complete("deepseek-moe", "train", "--schedule.schedule_type=w") == [
        "--schedule.schedule_type=wsd"
    ]
    # a value without choices: nothing (bash then completes file names, `complete -o default`)
    assert complete("deepseek-moe", "train", "--training.max_iters", "") == []
    assert complete("deepseek-moe", "train", "") == []


@needs_bash
def test_every_choice_field_offers_its_choices():
    checked = 0
    for flag, path in FLAGS.items():
        spec = FIELDS[path]
        expected = [str(c) for c in spec.choices or ()] + [v for v, _ in spec.sentinels]
        if spec.type == "bool":
            expected = ["true", "false"]
        if expected and flag == path:
            assert complete("deepseek-moe", "train", f"--{flag}", "") == sorted(expected), flag
            checked += 1
    assert checked >= 20


@needs_bash
def test_no_config_flags_where_none_go():
    assert complete("deepseek-moe", "sample", "--mod") == []
    assert complete("deepseek-moe", "config", "migrate", "x.yaml", "--mod") == []
    assert complete("deepseek-moe", "export", "--he") == ["--help"]
    assert complete("deepseek-moe", "data", "prepare", "--training.") == []


def test_the_command_prints_the_generated_scripts(capsys):
    assert "completion" in cli.COMMANDS and "completion" in cli.USAGE
    for shell, path in SCRIPTS.items():
        assert completion_cli.main([shell]) == 0
        assert capsys.readouterr().out == path.read_text()
    assert completion_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "source <(deepseek-moe completion bash)" in out and "completion fish" in out


@pytest.mark.parametrize("argv", [[], ["tcsh"], ["bash", "zsh"]])
def test_a_missing_or_unknown_shell_is_a_usage_error(argv, capsys):
    assert completion_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("completion: error: name one shell: bash, zsh, fish")


def test_the_command_runs_as_a_module():
    result = subprocess.run(
        [PYTHON, "-m", "runtime", "completion", "bash"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == SCRIPTS["bash"].read_text()


def test_the_completion_tables_match_the_commands():
    assert tuple(config_cli.COMMANDS) == cli.SUBCOMMANDS["config"]
    from runtime.cli import data as data_cli

    for sub in cli.SUBCOMMANDS["data"]:
        assert f"  {sub} " in data_cli.USAGE
    assert set(cli.SUBCOMMANDS) <= set(cli.COMMANDS)
    for place in cli.CONFIG_FLAG_PLACES:
        command, _, sub = place.partition(" ")
        assert command in cli.COMMANDS and (not sub or sub in cli.SUBCOMMANDS[command]), place
    assert "config migrate" not in cli.CONFIG_FLAG_PLACES  # it takes no flags


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts_name_every_flag_and_choice(shell):
    text = SCRIPTS[shell].read_text()
    for flag in FLAGS:
        written = f"--{flag}" if shell == "zsh" else f"-l {flag} "
        assert written in text, flag
    assert "sigmoid softmax" in text and "true false" in text
    for command in cli.COMMANDS:
        assert command in text
    if shell == "zsh":
        assert text.startswith("#compdef deepseek-moe\n")


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_scripts_parse(shell):
    executable = shutil.which(shell)
    if executable is None:
        pytest.skip(f"{shell} is not installed: syntax not checked")
    result = subprocess.run([executable, "-n", str(SCRIPTS[shell])], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_bash
def test_the_bash_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPTS["bash"])], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_fish_completes_commands_flags_and_choices():
    fish = shutil.which("fish")
    if fish is None:
        pytest.skip("fish is not installed")

    def complete_fish(line):
        script = f"source {shlex.quote(str(SCRIPTS['fish']))}; complete -C {shlex.quote(line)}"
        result = subprocess.run([fish, "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return sorted(entry.split("\t")[0] for entry in result.stdout.splitlines())

    assert complete_fish("deepseek-moe tr") == ["train"]
    assert complete_fish("deepseek-moe data ") == ["inspect", "prepare", "replay"]
    assert complete_fish("deepseek-moe train --model.sco") == [
        "--model.score_func",
        "--model.scoring_func",
    ]
    assert complete_fish("deepseek-moe train --model.score_func ") == ["sigmoid", "softmax"]
    assert complete_fish("deepseek-moe sample --model.sco") == []


def test_zsh_completes_commands_flags_and_choices():
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed")
    # compadd, _files and compdef stand in for zsh's completion system: print what is offered
    stubs = (
        "compdef() { :; }\n"
        "_files() { print -r -- '<files>'; }\n"
        "compadd() { local p=''; while [[ $1 == -* && $1 != -- ]]; do\n"
        "  if [[ $1 == -P ]]; then p=$2; shift 2; else shift; fi; done\n"
        "  [[ $1 == -- ]] && shift; for w in $@; do print -r -- $p$w; done; }\n"
    )

    def complete_zsh(*words):
        script = (
            f"{stubs}source {shlex.quote(str(SCRIPTS['zsh']))}\n"
            f"words=({' '.join(shlex.quote(w) for w in words)}); CURRENT={len(words)}\n"
            "_deepseek_moe\n"
        )
        result = subprocess.run([zsh, "-f", "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return sorted(w for w in result.stdout.splitlines() if w.startswith(words[-1]))

    assert complete_zsh("deepseek-moe", "tr") == ["train"]
    assert complete_zsh("deepseek-moe", "config", "sh") == ["show"]
    assert complete_zsh("deepseek-moe", "train", "--model.sco") == [
        "--model.score_func",
        "--model.scoring_func",
    ]
    assert complete_zsh("deepseek-moe", "train", "--model.score_func", "") == [
        "sigmoid",
        "softmax",
    ]
    assert complete_zsh("deepseek-moe", "train", "--model.score_func=s") == [
        "--model.score_func=sigmoid",
        "--model.score_func=softmax",
    ]
    assert complete_zsh("deepseek-moe", "sample", "--model.sco") == []
