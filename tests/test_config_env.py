"""Environment values (`${env:NAME}`, `${env:NAME,default}`) in config files and flags, and secret
fields (`secret: true`, wandb.api_key): reading with the field's type, problems naming the
variable and file:line, provenance in `config explain` and saved YAML, and secrets never shown or
saved."""

import warnings

import pytest
import yaml

from codegen.spec import SpecError, load_spec
from generated import (
    PATH,
    SPEC,
    ConfigError,
    config_from_dict,
    dump_yaml,
    flat_values,
    load_config,
    migrate_text,
    reconcile_with_checkpoint,
    resolve,
    to_saved_dict,
)
from runtime.cli import config as config_cli
from runtime.configlib import SECRET_PLACEHOLDER, env_sources

KEY = "sk-test-0123456789abcdef"  # a made-up API key


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("RUN_LR", "RUN_N", "SCRATCH", "RUN_TAG", "RUN_UNSET", "RUN_ON", "RUN_KEY"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems_of(excinfo):
    return [str(problem) for problem in excinfo.value.problems]


def run_config(capsys, *argv):
    with warnings.catch_warnings(record=True):
        code = config_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- reading values ---------------------------------------------------------------------------------


def test_a_whole_value_is_read_with_the_fields_type(tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_LR", "6e-4")
    monkeypatch.setenv("RUN_N", "3")
    monkeypatch.setenv("RUN_ON", "true")
    path = write(
        tmp_path,
        "optimizer:\n  lr: ${env:RUN_LR}\nmodel:\n  n_layers: ${env:RUN_N}\n"
        "system:\n  compile:\n    compile: ${env:RUN_ON}\n",
    )
    config = load_config(path)
    assert config.optimizer.lr == 6e-4 and type(config.optimizer.lr) is float
    assert config.model.n_layers == 3 and type(config.model.n_layers) is int
    assert config.system.compile.compile is True


def test_inside_a_string_lists_records_and_shorthands(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCH", "/scratch/me")
    monkeypatch.setenv("RUN_TAG", "night")
    monkeypatch.setenv("RUN_ON", "true")
    path = write(
        tmp_path,
        "out_dir: ${env:SCRATCH}/runs/x\n"
        "wandb:\n  tags:\n    - ${env:RUN_TAG}\n    - fixed\n"
        "data:\n  sources:\n    - path: ${env:SCRATCH}/corpus\n      weight: ${env:RUN_UNSET,2}\n"
        "system:\n  distributed: ${env:RUN_ON}\n",
    )
    config = load_config(path)
    assert config.out_dir == "/scratch/me/runs/x"
    assert config.wandb.tags == ["night", "fixed"]
    assert (config.data.sources[0].path, config.data.sources[0].weight) == (
        "/scratch/me/corpus",
        2.0,
    )
    assert config.system.distributed.enabled is True


def test_defaults_of_unset_variables(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        "optimizer:\n  lr: ${env:RUN_LR,0.001}\nout_dir: out/${env:RUN_TAG,}run\n"
        "wandb:\n  run_name: ${env:RUN_TAG,null}\n  tags: ${env:RUN_TAG,a,b}\n",
    )
    config = load_config(path)
    assert config.optimizer.lr == 0.001 and config.out_dir == "out/run"
    assert config.wandb.run_name is None and config.wandb.tags == ["a", "b"]
    monkeypatch.setenv("RUN_LR", "0.002")
    assert load_config(path).optimizer.lr == 0.002  # a set variable wins over the default


def test_flags_read_the_environment_too(monkeypatch):
    monkeypatch.setenv("RUN_LR", "0.003")
    monkeypatch.setenv("RUN_TAG", "b")
    config = load_config(
        argv=["--optimizer.lr", "${env:RUN_LR}", "--wandb.tags=a,${env:RUN_TAG}", "--seed", "7"]
    )
    assert config.optimizer.lr == 0.003 and config.wandb.tags == ["a", "b"] and config.seed == 7
    resolved = resolve(argv=["--optimizer.lr", "${env:RUN_LR}"])
    assert resolved.sources[PATH.optimizer.lr].describe() == (
        "environment RUN_LR (command line --optimizer.lr)"
    )


def test_a_variables_value_is_not_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCH", "${env:RUN_UNSET}")
    assert load_config(write(tmp_path, "out_dir: ${env:SCRATCH}\n")).out_dir == "${env:RUN_UNSET}"


# --- problems ---------------------------------------------------------------------------------------


def test_a_wrong_type_names_the_field_the_line_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_N", "abc")
    path = write(tmp_path, "seed: 1\nmodel:\n  n_layers: ${env:RUN_N}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert problems_of(excinfo) == [
        f"{path}:3: model.n_layers: expected an integer, found 'abc' (read from environment "
        "variable RUN_N)"
    ]
    assert excinfo.value.problems[0].kind == "value"


def test_an_unset_variable_is_collected_with_the_other_problems(tmp_path, capsys):
    path = write(
        tmp_path, "optimizer:\n  lr: ${env:RUN_LR}\ntraining:\n  batch_size: 0\n  nope: 1\n"
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    found = problems_of(excinfo)
    assert len(found) == 3, found
    assert (
        f"{path}:2: optimizer.lr: environment variable RUN_LR is not set, and ${{env:RUN_LR}} "
        "gives no default (set it, or write ${env:RUN_LR,VALUE})"
    ) in found
    assert [p.kind for p in excinfo.value.problems if p.path == PATH.optimizer.lr] == ["env"]
    assert any("training.batch_size: must be >= 1" in p for p in found)
    assert any("training.nope: unknown key" in p for p in found)
    code, _, err = run_config(capsys, "validate", path)
    assert code == 2 and "RUN_LR is not set" in err and f"{path}:2" in err


def test_an_unset_variable_in_a_flag_names_the_flag():
    with pytest.raises(ConfigError) as excinfo:
        load_config(argv=["--model.n_layers", "${env:RUN_N}"])
    assert problems_of(excinfo) == [
        "command line --model.n_layers: model.n_layers: environment variable RUN_N is not set, "
        "and ${env:RUN_N} gives no default (set it, or write ${env:RUN_N,VALUE})"
    ]


@pytest.mark.parametrize("value", ["${env:}", "${env:1X}", "${env:RUN_N", "a${env:RUN_N,x}${env:"])
def test_a_malformed_reference_is_an_error(tmp_path, value):
    path = write(tmp_path, f"out_dir: '{value}'\n")
    with pytest.raises(ConfigError, match="malformed environment reference") as excinfo:
        load_config(path)
    assert str(excinfo.value.problems[0]).startswith(f"{path}:1: out_dir: ")


def test_other_dollar_text_is_plain(tmp_path):
    text = "out_dir: $HOME/${HOME}/${ENV:X}\n"
    assert load_config(write(tmp_path, text)).out_dir == "$HOME/${HOME}/${ENV:X}"


# --- provenance: explain, saved YAML, saved dict ----------------------------------------------------


def test_explain_names_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RUN_LR", "0.002")
    base = write(tmp_path, "optimizer:\n  lr: ${env:RUN_LR}\n", "base.yaml")
    path = write(tmp_path, "base: base.yaml\nseed: ${env:RUN_N,5}\n")
    code, out, _ = run_config(capsys, "explain", path, "optimizer.lr", "seed")
    assert code == 0
    assert out.splitlines() == [
        "optimizer.lr = 0.002",
        f"  from environment RUN_LR ({base}:2, base file)",
        "  overrides 0.001 from spec default",
        "seed = 5",
        f"  from environment RUN_N (unset: its default) ({path}:2)",
        "  overrides 1337 from spec default",
    ]
    code, out, _ = run_config(
        capsys, "explain", path, "optimizer.lr", "--optimizer.lr", "${env:RUN_LR,9}"
    )
    assert out.splitlines()[1:3] == [
        "  from environment RUN_LR (command line --optimizer.lr)",
        f"  overrides 0.002 from environment RUN_LR ({base}:2, base file)",
    ]


def test_saved_yaml_holds_the_value_and_names_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RUN_LR", "0.002")
    monkeypatch.setenv("SCRATCH", "/scratch")
    path = write(tmp_path, "optimizer:\n  lr: ${env:RUN_LR}\nout_dir: ${env:SCRATCH}/x\n")
    resolved = resolve(path)
    text = dump_yaml(resolved.config)
    lines = text.splitlines()
    at = lines.index("  lr: 0.002")
    assert lines[at - 1] == f"  # from environment RUN_LR ({path}:2)"
    at = lines.index("out_dir: /scratch/x")
    assert lines[at - 1] == f"# from environment SCRATCH ({path}:3)"
    assert "${env:" not in text
    code, out, _ = run_config(capsys, "show", path)
    assert code == 0 and out == text
    monkeypatch.delenv("RUN_LR")  # the saved file stands alone
    assert load_config(text=text) == resolved.config
    saved = to_saved_dict(resolved.config)
    assert saved["optimizer"]["lr"] == 0.002 and saved["out_dir"] == "/scratch/x"
    assert config_from_dict(saved) == resolved.config
    assert env_sources(load_config(text=text)) == {}  # read from no variable


def test_provenance_survives_reconciling_with_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_LR", "0.002")
    path = write(tmp_path, "optimizer:\n  lr: ${env:RUN_LR}\n")
    resolved = resolve(path)
    again, _ = reconcile_with_checkpoint(resolved, to_saved_dict(load_config(text="")), "ck.pt")
    assert again.config is not resolved.config and again.config.optimizer.lr == 0.002
    assert f"# from environment RUN_LR ({path}:2)" in dump_yaml(again.config)


def test_migrate_keeps_the_references_as_written(tmp_path):
    text = "optimizer:\n  learning_rate: ${env:RUN_LR,0.001}\nout_dir: ${env:SCRATCH}/x\n"
    migrated = yaml.safe_load(migrate_text(text))
    assert migrated["optimizer"] == {"lr": "${env:RUN_LR,0.001}"}
    assert migrated["out_dir"] == "${env:SCRATCH}/x"


# --- secret fields ----------------------------------------------------------------------------------


def test_the_secret_field_is_marked_in_the_spec():
    assert SPEC.secret_paths == (PATH.wandb.api_key,)
    assert SPEC.fields[PATH.wandb.api_key].secret and SPEC.fields[PATH.wandb.api_key].nullable


def test_a_secret_never_lands_in_saved_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RUN_KEY", KEY)
    path = write(tmp_path, "wandb:\n  enabled: true\n  api_key: ${env:RUN_KEY}\n")
    resolved = resolve(path)
    assert resolved.config.wandb.api_key == KEY  # the run itself has it
    assert KEY not in repr(resolved.config)  # the dataclass does not show it
    saved = to_saved_dict(resolved.config)
    assert saved["wandb"]["api_key"] == SECRET_PLACEHOLDER
    text = dump_yaml(resolved.config)
    assert KEY not in text and f"api_key: {SECRET_PLACEHOLDER}" in text
    assert f"# from environment RUN_KEY ({path}:3)" in text  # which variable to set again
    # read back, the placeholder is no value: the key comes from the run's own config
    assert load_config(text=text).wandb.api_key is None
    assert config_from_dict(saved).wandb.api_key is None
    for argv in (
        ["show", path],
        ["show", path, "--changed"],
        ["explain", path, "wandb.api_key"],
        ["diff", path, write(tmp_path, "wandb:\n  api_key: other\n", "y.yaml")],
    ):
        code, out, err = run_config(capsys, *argv)
        assert code == 0 and KEY not in out + err and SECRET_PLACEHOLDER in out, argv
    assert flat_values(resolved.config)[PATH.wandb.api_key] == KEY


def test_a_resumed_run_takes_the_secret_from_its_own_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_KEY", "new-key")
    saved = to_saved_dict(load_config(argv=["--wandb.api_key", KEY]))
    assert KEY not in str(saved)
    mine = resolve(argv=["--wandb.api_key", "${env:RUN_KEY}"])
    again, notes = reconcile_with_checkpoint(mine, saved, "ck.pt")
    assert again.config.wandb.api_key == "new-key" and notes == []
    again, notes = reconcile_with_checkpoint(resolve(text=""), saved, "ck.pt")
    assert again.config.wandb.api_key is None and notes == []


def test_messages_do_not_show_a_secret(tmp_path):
    path = write(tmp_path, "wandb:\n  api_key: [12345]\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert "12345" not in str(excinfo.value) and SECRET_PLACEHOLDER in str(excinfo.value)
    path = write(tmp_path, "wandb:\n  api_key: abc\n  api_key: abd\n")  # YAML's duplicate key
    with pytest.raises(ConfigError):
        load_config(path)


SPEC_HEAD = """\
version: 1
root:
  class: Config
  doc: A run.
  fields:
    - name: seed
      type: int
      default: 0
      doc: Seed.
sections:
  - name: log
    class: LogConfig
    doc: Logging.
{policy}    fields:
      - name: token
        type: {type}
        default: {default}
        secret: {secret}
        doc: A token.
"""


@pytest.mark.parametrize(
    "type_, default, secret, policy, message",
    [
        ("int?", "null", "true", "", "'secret' only applies to str fields"),
        ("str", "abc", "true", "", "a secret field's default must be null"),
        ("str?", "null", "yes", "", "'secret' must be true or false"),
        ("str?", "null", "true", "    policy: must_match\n", "policy must be overridable"),
    ],
)
def test_the_spec_checks_secret_fields(type_, default, secret, policy, message):
    text = SPEC_HEAD.format(type=type_, default=default, secret=secret, policy=policy)
    with pytest.raises(SpecError, match=message):
        load_spec("spec.yaml", text)


def test_a_secret_spec_field_generates():
    text = SPEC_HEAD.format(type="str?", default="null", secret="true", policy="")
    spec = load_spec("spec.yaml", text)
    assert [f.path for f in spec.fields() if f.secret] == ["log.token"]
