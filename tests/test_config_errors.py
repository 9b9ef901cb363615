"""Bad config input: every problem is caught, located (key path and file:line or flag) and
reported together; unsafe YAML never runs; old names warn once; flags override the file."""

import re
import textwrap
import warnings

import pytest

import generated.parser as parser_module
from generated import (
    FIELDS,
    SECTIONS,
    Config,
    ConfigAliasWarning,
    ConfigError,
    build_arg_parser,
    load_config,
    resolved_from_config,
)


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path, text, argv=()):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path, argv=argv)
    return path, raised.value.problems


def only_problem(tmp_path, text, argv=()):
    path, problems = problems_of(tmp_path, text, argv)
    assert len(problems) == 1, problems
    return path, problems[0]


def assert_located(problem, path, line, key):
    """The problem names the key path and file:line, both as data and in its message."""
    assert problem.path == key
    assert (problem.source.kind, problem.source.file, problem.source.line) == (
        "file",
        str(path),
        line,
    )
    assert str(problem).startswith(f"{path}:{line}: {key}: "), str(problem)


def test_unknown_key_did_you_mean(tmp_path):
    path, problem = only_problem(tmp_path, "training:\n  batch_sise: 4\n")
    assert_located(problem, path, 2, "training.batch_sise")
    assert "did you mean 'batch_size'" in problem.message


def test_unknown_section_did_you_mean(tmp_path):
    path, problem = only_problem(tmp_path, "optimiser:\n  lr: 0.1\n")
    assert_located(problem, path, 1, "optimiser")
    assert "did you mean 'optimizer'" in problem.message


def test_key_in_the_wrong_section_says_where_it_belongs(tmp_path):
    path, problem = only_problem(tmp_path, "training:\n  eval_only: true\n")
    assert_located(problem, path, 2, "training.eval_only")
    assert "belongs in 'evaluator'" in problem.message and "evaluator.eval_only" in problem.message


def test_wrong_type(tmp_path):
    path, problem = only_problem(tmp_path, "training:\n  batch_size: four\n")
    assert_located(problem, path, 2, "training.batch_size")
    assert "expected an integer" in problem.message and "'four'" in problem.message


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("training:\n  batch_size: true\n", "training.batch_size", "expected an integer"),
        ("data:\n  pin_memory: 1\n", "data.pin_memory", "expected a boolean"),
        ("wandb:\n  tags: a\n", "wandb.tags", "expected a list"),
        ("schedule:\n  phase_steps: [1, x]\n", "schedule.phase_steps", "expected an integer"),
        ("optimizer:\n  lr: .nan\n", "optimizer.lr", "finite"),
        ("model:\n  dim: null\n", "model.dim", "found null"),
    ],
)
def test_wrong_types(tmp_path, text, key, expected):
    path, problem = only_problem(tmp_path, text)
    assert_located(problem, path, 2, key)
    assert expected in problem.message


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("training:\n  batch_size: 0\n", "training.batch_size", "must be >= 1"),
        ("optimizer:\n  beta1: 1.5\n", "optimizer.beta1", "must be <= 1"),
        ("optimizer:\n  lr: 0\n", "optimizer.lr", "must be > 0"),
        ("model:\n  score_func: relu\n", "model.score_func", "must be one of 'sigmoid', 'softmax'"),
    ],
)
def test_value_outside_constraints(tmp_path, text, key, expected):
    path, problem = only_problem(tmp_path, text)
    assert_located(problem, path, 2, key)
    assert expected in problem.message


def test_violated_cross_field_rule(tmp_path):
    path, problem = only_problem(tmp_path, "optimizer:\n  lr: 0.001\nschedule:\n  min_lr: 0.01\n")
    # Blamed on one of the fields involved, at that field's line; the message names both.
    line = {"optimizer.lr": 2, "schedule.min_lr": 4}[problem.path]
    assert_located(problem, path, line, problem.path)
    assert "schedule.min_lr <= optimizer.lr" in problem.message
    assert f"optimizer.lr = 0.001 ({path}:2)" in problem.message
    assert f"schedule.min_lr = 0.01 ({path}:4)" in problem.message


def test_rule_over_defaults_blames_the_field_that_was_set(tmp_path):
    path, problem = only_problem(tmp_path, "schedule:\n  min_lr: 0.5\n")
    assert_located(problem, path, 2, "schedule.min_lr")
    assert "optimizer.lr = 0.001 (spec default)" in problem.message


def test_rule_with_when_applies_only_then(tmp_path):
    assert load_config(write(tmp_path, "data:\n  dataset: stdlib\n")).data.path is None
    path, problem = only_problem(tmp_path, "data:\n  dataset: bin\n")
    assert "need a path" in problem.message and problem.path == "data.dataset"


def test_alias_and_canonical_with_different_values(tmp_path):
    path, problem = only_problem(tmp_path, "optimizer:\n  lr: 0.001\n  learning_rate: 0.002\n")
    assert problem.path == "optimizer.lr"
    assert "given twice with different values" in problem.message
    assert "'optimizer.learning_rate'" in problem.message and f"{path}:2" in problem.message
    assert str(problem).startswith(f"{path}:3: ")


@pytest.mark.parametrize(
    "text",
    [
        "optimizer:\n  lr: 0.001\n  learning_rate: 0.001\n",
        "optimizer:\n  lr: 0.001\n  learning_rate: 1e-3\n",  # same value, different spelling
        "seed: 5\ntraining:\n  seed: 5\n",  # a moved key
        "wandb:\n  use_wandb: true\n  wandb_log: true\n",  # two old names of one field
    ],
)
def test_alias_and_canonical_with_the_same_value_is_fine(tmp_path, text):
    config = load_config(write(tmp_path, text))
    assert config.optimizer.lr == 0.001 and config.seed in (5, 1337)


def test_moved_key_conflict(tmp_path):
    path, problem = only_problem(tmp_path, "seed: 5\ntraining:\n  seed: 6\n")
    assert problem.path == "seed" and "given twice" in problem.message


def test_section_given_a_scalar_without_shorthand(tmp_path):
    path, problem = only_problem(tmp_path, "model: 3\n")
    assert_located(problem, path, 1, "model")
    assert "is a section" in problem.message and "found 3" in problem.message


def test_section_shorthand_with_a_list_is_an_error(tmp_path):
    path, problem = only_problem(tmp_path, "system:\n  distributed: [true]\n")
    assert_located(problem, path, 2, "system.distributed")
    assert "'enabled'" in problem.message


def test_field_given_a_mapping(tmp_path):
    path, problem = only_problem(tmp_path, "training:\n  batch_size:\n    value: 3\n")
    assert_located(problem, path, 2, "training.batch_size")
    assert "not a section" in problem.message


def test_yaml_syntax_error(tmp_path):
    path, problem = only_problem(
        tmp_path, "seed: 1\ntraining:\n  batch_size: [1, 2\n  seq_len: 3\n"
    )
    assert problem.source.file == str(path) and problem.source.line in (3, 4)
    assert "YAML syntax error" in problem.message


@pytest.mark.parametrize(
    "payload",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/apply:subprocess.call [['touch', '{marker}']]",
        "!!python/name:os.system",
        "!custom {marker}",
    ],
)
def test_unsafe_tags_are_rejected_and_never_run(tmp_path, payload):
    marker = tmp_path / "pwned"
    path, problem = only_problem(tmp_path, f"seed: 1\nout_dir: {payload.format(marker=marker)}\n")
    assert not marker.exists()
    assert problem.source.line == 2 and "tag" in problem.message and "rejected" in problem.message


def test_duplicate_keys(tmp_path):
    path, problem = only_problem(tmp_path, "training:\n  batch_size: 4\n  batch_size: 8\n")
    assert problem.source.line == 3
    assert "duplicate key 'batch_size'" in problem.message and "line 2" in problem.message


def test_duplicate_sections(tmp_path):
    path, problem = only_problem(tmp_path, "model:\n  dim: 8\nmodel:\n  dim: 16\n")
    assert problem.source.line == 3 and "duplicate key 'model'" in problem.message


def test_non_utf8_bytes(tmp_path):
    path, problem = only_problem(tmp_path, b"seed: 1\nout_dir: caf\xe9\n")
    assert problem.source.file == str(path)
    assert "UTF-8" in problem.message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path, text):
    config = load_config(write(tmp_path, text))
    assert config == resolved_from_config(Config()).config
    assert config.checkpointer.save_dir == "out/checkpoints"  # the derived default, filled in


def test_top_level_not_a_mapping(tmp_path):
    path, problem = only_problem(tmp_path, "- a\n- b\n")
    assert "mapping" in problem.message


def test_all_problems_are_reported_together(tmp_path):
    text = """\
        seed: -1
        foo: 1
        model:
          n_layers: 0
          score_func: relu
        training:
          batch_size: x
          eval_only: true
        optimizer:
          lr: 0.001
        schedule:
          min_lr: 0.01
        """
    path, problems = problems_of(tmp_path, text)
    assert len(problems) == 7, "\n".join(map(str, problems))
    assert sorted(p.source.line for p in problems)[:6] == [1, 2, 4, 5, 7, 8]
    assert sorted(p.source.line for p in problems)[6] in (10, 12)  # the rule over lr and min_lr
    for problem in problems:
        assert str(problem).startswith(f"{path}:{problem.source.line}: {problem.path}: ")
    with pytest.raises(ConfigError, match=r"^7 config problems:"):
        load_config(path)


def test_float_written_without_a_dot_is_accepted(tmp_path):
    config = load_config(write(tmp_path, "optimizer:\n  lr: 6e-4\nschedule:\n  min_lr: 6E-5\n"))
    assert config.optimizer.lr == 6e-4 and isinstance(config.optimizer.lr, float)
    assert config.schedule.min_lr == 6e-5
    assert load_config(write(tmp_path, "optimizer:\n  lr: 1\n")).optimizer.lr == 1.0
    assert isinstance(load_config(argv=["--optimizer.lr", "6e-4"]).optimizer.lr, float)


def test_alias_warns_naming_the_canonical_key_and_the_file(tmp_path):
    path = write(tmp_path, "optimizer:\n  learning_rate: 0.002\n")
    other = tmp_path / "other.yaml"
    other.write_text("seed: 1\noptimizer:\n  learning_rate: 0.002\n")
    for source, line in ((path, 2), (path, 2), (other, 3)):  # every load warns about its own file
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert load_config(source).optimizer.lr == 0.002
        alias_warnings = [w for w in caught if issubclass(w.category, ConfigAliasWarning)]
        assert len(alias_warnings) == 1
        message = str(alias_warnings[0].message)
        assert "'optimizer.learning_rate'" in message and "'optimizer.lr'" in message
        assert f"{source}:{line}" in message


@pytest.mark.parametrize(
    "argv",
    [
        ["--training.max_iters", "7", "--optimizer.lr", "6e-4"],
        ["--training.max_iters=7", "--optimizer.lr=6e-4"],
        ["--training.max_iters", "3", "--optimizer.lr=6e-4", "--training.max_iters=7"],
    ],
)
def test_flags_override_the_file(tmp_path, argv):
    path = write(tmp_path, "training:\n  max_iters: 100\noptimizer:\n  lr: 0.01\n")
    resolved = parser_module.resolve(path, argv=argv)
    assert resolved.config.training.max_iters == 7  # later flags win
    assert resolved.config.optimizer.lr == 6e-4
    assert resolved.sources["training.max_iters"].kind == "cli"
    assert resolved.sources["training.max_iters"].flag == "--training.max_iters"


def test_flag_values_of_every_kind():
    config = load_config(
        argv=[
            "--wandb.tags",
            "[a, b]",
            "--wandb.enabled",
            "true",
            "--data.path",
            "x.bin",
            "--data.dataset",
            "bin",
            "--checkpointer.save_dir=null",
            "--system.distributed",
            "true",
            "--system.device",
            "cuda",
            "--model.hidden_size",
            "64",
        ]
    )
    assert config.wandb.tags == ["a", "b"] and config.wandb.enabled is True
    assert (config.data.dataset, config.data.path) == ("bin", "x.bin")
    assert config.checkpointer.save_dir == "out/checkpoints"  # null: the derived default
    assert config.system.distributed.enabled and config.system.device.device == "cuda"
    assert config.model.dim == 64


def test_bad_flag_value_names_the_flag():
    with pytest.raises(ConfigError) as raised:
        load_config(argv=["--training.batch_size", "four"])
    (problem,) = raised.value.problems
    assert problem.source.kind == "cli" and problem.source.flag == "--training.batch_size"
    assert str(problem).startswith("command line --training.batch_size: training.batch_size: ")


def test_unknown_flag_with_suggestion(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_config(argv=["--training.batch_sise", "4", "--nonsense", "1"])
    problems = raised.value.problems
    assert len(problems) == 2
    assert (
        "unknown flag --training.batch_sise; did you mean --training.batch_size?"
        in problems[0].message
    )
    assert "unknown flag --nonsense" in problems[1].message


def test_flag_without_value_and_stray_argument():
    with pytest.raises(ConfigError) as raised:
        load_config(argv=["stray", "--training.batch_size"])
    messages = [p.message for p in raised.value.problems]
    assert any("unexpected argument 'stray'" in m for m in messages)
    assert any("needs a value" in m for m in messages)


def test_file_and_flag_problems_are_reported_together(tmp_path):
    path, problems = problems_of(tmp_path, "training:\n  batch_size: 0\n", argv=["--nope", "1"])
    assert {p.source.kind for p in problems} == {"file", "cli"}


def test_help_lists_every_flag_and_doc():
    help_text = build_arg_parser().format_help()
    squashed = re.sub(r"\s+", "", help_text)
    for path, spec in FIELDS.items():
        assert re.search(rf"--{re.escape(path)}\b", help_text), path
        assert re.sub(r"\s+", "", spec.doc) in squashed, f"doc of {path} missing from --help"
        for alias in spec.aliases:
            assert f"--{alias}" in help_text, alias
    for path, section in SECTIONS.items():
        if path:
            assert re.sub(r"\s+", "", section.doc) in squashed, path


def test_help_shows_defaults_and_choices():
    help_text = " ".join(build_arg_parser().format_help().split())
    assert "Default: 600." in help_text  # training.max_iters
    assert "One of: sigmoid, softmax." in help_text
