"""Counts with a unit (`469B tokens`, `2K steps`) in configs, and the batch-size ramp that turns
tokens into steps: parsing, the ramp's arithmetic against a step-by-step simulation, resolution at
load, what explain and show print, errors, and the paper's recipe."""

import pytest
import yaml

from generated import ConfigError, batch_ramp, dump_yaml, load_config, resolve
from helpers import REPO
from runtime.cli import config as config_cli
from runtime.configlib.quantities import BatchRamp, Quantity, format_count, parse_quantity

TINY_RAMP = """
training:
  batch_size: 2
  seq_len: 8
  gradient_accumulation_steps: 6
  batch_size_start: 4
  batch_size_increment: 4
  batch_size_rampup: 64 tokens
"""


@pytest.mark.parametrize(
    ("text", "field_type", "amount", "unit"),
    [
        ("14.3T tokens", "steps", 14_300_000_000_000, "tokens"),
        ("469B tokens", "steps", 469_000_000_000, "tokens"),
        ("2K steps", "steps", 2000, "steps"),
        ("2000 step", "steps", 2000, "steps"),
        ("1token", "steps", 1, "tokens"),
        ("469B", "tokens", 469_000_000_000, "tokens"),
        ("4096", "tokens", 4096, "tokens"),
        ("2.5K tokens", "tokens", 2500, "tokens"),
    ],
)
def test_counts_parse_with_their_unit(text, field_type, amount, unit):
    parsed = parse_quantity(text, field_type)
    assert parsed == Quantity(amount, unit, text)


@pytest.mark.parametrize(
    ("text", "field_type", "says"),
    [
        ("469B", "steps", "needs a unit"),
        ("1.5 tokens", "steps", "not a whole number"),
        ("2K steps", "tokens", "this field counts tokens"),
        ("12 stepz", "steps", "expected an integer or"),
        ("many tokens", "steps", "expected an integer or"),
        ("3Q tokens", "steps", "expected an integer or"),
    ],
)
def test_bad_counts_say_why(text, field_type, says):
    problem = parse_quantity(text, field_type)
    assert isinstance(problem, str) and says in problem


def test_counts_are_formatted_the_way_the_paper_writes_them():
    assert format_count(14_300_000_000_000) == "14.3T"
    assert format_count(14_633_000_000_000) == "14.633T"
    assert format_count(469_000_000_000) == "469B"
    assert format_count(2000) == "2K"
    assert format_count(4096) == "4,096"
    assert format_count(25_165_824_000) == "25,165,824,000"  # not 25165.824M


def simulate(seq_len, full, start, increment, rampup, steps):
    """Megatron's ramp, one step at a time: (batch, tokens before) of each step."""
    n = -(-(full - start) // increment)
    out, tokens = [], 0
    for _ in range(steps):
        k = tokens * n // rampup
        batch = full if k >= n else min(full, start + k * increment)
        out.append((batch, tokens))
        tokens += batch * seq_len
    return out


@pytest.mark.parametrize(
    ("seq_len", "full", "start", "increment", "rampup"),
    [(8, 12, 2, 4, 64), (4, 16, 4, 4, 1000), (16, 64, 8, 8, 3), (3, 30, 6, 6, 10_000)],
)
def test_the_ramp_matches_a_step_by_step_simulation(seq_len, full, start, increment, rampup):
    ramp = BatchRamp(seq_len=seq_len, full=full, start=start, increment=increment, rampup=rampup)
    expected = simulate(seq_len, full, start, increment, rampup, 400)
    assert [(ramp.batch(s), ramp.tokens_before(s)) for s in range(400)] == expected
    assert ramp.samples_before(400) * seq_len == expected[-1][1] + expected[-1][0] * seq_len
    for tokens in range(0, expected[-1][1], max(1, expected[-1][1] // 97)):
        step = ramp.step_at_tokens(tokens)  # the first step count reaching `tokens`
        assert ramp.tokens_before(step) >= tokens
        assert step == 0 or ramp.tokens_before(step - 1) < tokens


def test_no_ramp_is_one_stage():
    ramp = BatchRamp(seq_len=128, full=16)
    assert not ramp.ramps and ramp.batch(10**9) == 16
    assert ramp.step_at_tokens(128 * 16 * 5) == 5 and ramp.step_at_tokens(128 * 16 * 5 + 1) == 6


def test_token_counts_resolve_to_steps_at_load():
    config = load_config(text=TINY_RAMP + "  max_iters: 200 tokens\n")
    ramp = batch_ramp(config)
    # 4 sequences of 8 tokens until 64/2 tokens, then 8 until 64, then the full 12
    assert [(s.first_step, s.batch) for s in ramp.stages] == [(0, 4), (1, 8), (2, 12)]
    assert [ramp.tokens_before(s) for s in range(5)] == [0, 32, 96, 192, 288]
    assert config.training.max_iters == ramp.step_at_tokens(200) == 4
    plain = load_config(text="training: {max_iters: 2K steps, seq_len: 8}")
    assert plain.training.max_iters == 2000


def test_flags_take_counts_too():
    config = load_config(
        text=TINY_RAMP,
        argv=["--training.max_iters", "1K tokens", "--schedule.warmup_iters", "1 step"],
    )
    assert config.training.max_iters == batch_ramp(config).step_at_tokens(1000)
    assert config.schedule.warmup_iters == 1


def test_lists_and_records_resolve_each_item():
    config = load_config(
        text=TINY_RAMP
        + "  max_iters: 20\nschedule:\n  schedule_type: piecewise\n  warmup_iters: 1\n"
        "  phase_steps: [2, 100 tokens]\n  phase_names: [a, b]\n"
        "  segments:\n    - {until: 100 tokens, lr: 1.0e-4}\n    - {until: 15 steps, lr: 1.0e-5}\n"
    )
    step = batch_ramp(config).step_at_tokens(100)
    assert config.schedule.phase_steps == [2, step]
    assert [s.until for s in config.schedule.segments] == [step, 15]


def test_explain_shows_the_written_count_and_its_step(capsys, tmp_path):
    path = tmp_path / "ramp.yaml"
    path.write_text(
        TINY_RAMP + "  max_iters: 200 tokens\nmtp:\n  mtp_loss_weight_until: 2K steps\n"
    )
    assert (
        config_cli.main(["explain", str(path), "training.max_iters", "mtp.mtp_loss_weight_until"])
        == 0
    )
    out = capsys.readouterr().out
    assert "training.max_iters = 4\n" in out
    assert "  200 tokens = step 4 (batch ramp 4 -> 12 over 64 tokens, seq_len 8)\n" in out
    assert "  2K steps = 2,000 steps\n" in out


def test_show_keeps_the_written_form_and_reloads_to_the_same_config(tmp_path):
    resolved = resolve(
        text=TINY_RAMP + "  max_iters: 200 tokens\nmoe:\n  bias_update_speed_until: 100 tokens\n"
    )
    text = dump_yaml(resolved.config)
    shown = yaml.safe_load(text)
    assert shown["training"]["max_iters"] == "200 tokens"
    assert shown["training"]["batch_size_rampup"] == "64 tokens"
    assert shown["moe"]["bias_update_speed_until"] == "100 tokens"
    assert load_config(text=text) == resolved.config


def test_bad_counts_are_config_errors_naming_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "training:\n  max_iters: 469B\nschedule:\n  warmup_iters: 1.5 tokens\n"
        "  lr_decay_iters: 0 tokens\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert (
        f"{path}:2: training.max_iters: '469B' needs a unit: `469B tokens` or `469B steps`" in text
    )
    assert f"{path}:4: schedule.warmup_iters: '1.5 tokens' is not a whole number of tokens" in text
    # bounds hold for the step a token count resolves to
    assert f"{path}:5: schedule.lr_decay_iters: must be >= 1, found 0 (0 tokens = step 0" in text


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ["--training.batch_size_start", "3"],
            "the ramp's first batch must be whole micro-batches",
        ),
        (["--training.batch_size_start", "12"], "the ramp must start below the full batch"),
        (
            ["--training.batch_size_increment", "6"],
            "the ramp must reach the full batch in whole increments",
        ),
        (["--training.batch_size_rampup", "0"], "a batch-size ramp needs the tokens it grows over"),
    ],
)
def test_ramp_rules(flags, says):
    with pytest.raises(ConfigError, match=says):
        load_config(text=TINY_RAMP, argv=flags)


def test_the_paper_recipe_resolves_on_its_batch_ramp():
    config = load_config(REPO / "configs" / "deepseek_v3.yaml")
    ramp = batch_ramp(config)
    assert ramp.batch(0) == 3072 and ramp.stages[-1].batch == 15360
    assert ramp.tokens_before(ramp.stages[-1].first_step) >= 469 * 10**9  # full batch from 469B
    assert ramp.tokens_before(ramp.stages[-1].first_step - 1) < 469 * 10**9
    assert config.training.max_iters == ramp.step_at_tokens(14_800 * 10**9)
    assert config.moe.bias_update_speed_until == ramp.step_at_tokens(14_300 * 10**9)
    assert config.mtp.mtp_loss_weight_until == ramp.step_at_tokens(10_000 * 10**9)
    assert [s.until for s in config.schedule.segments] == [
        ramp.step_at_tokens(t * 10**9) for t in (10_000, 14_300, 14_633, 14_800)
    ]
    assert config.schedule.warmup_iters == 2000
