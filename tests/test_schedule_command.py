"""`deepseek-moe schedule`: the DeepSeek-V3 recipe's values at the report's token counts, the
default change points, --json, --plot and its usage errors (in-process, no training)."""

import json
import warnings

import pytest

from generated import PATH, batch_ramp, resolve
from helpers import REPO
from runtime.cli import console
from runtime.cli import main as cli
from runtime.cli import schedule as schedule_cli

V3 = str(REPO / "configs" / "deepseek_v3.yaml")


def run(capsys, *argv):
    with warnings.catch_warnings(record=True):  # main() sets a warnings filter; keep it inside
        code = schedule_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == console.EXIT_OK, err
    return json.loads(out)


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def test_the_papers_recipe_at_its_token_counts(capsys):
    at = "0,469B,5T,12.15T,14.4T,14.7T"
    start, ramped, stable, midpoint, tail, last = rows(capsys, V3, "--at", at)
    assert start["step"] == 0 and start["tokens"] == 0
    assert start["lr"] == 0.0 and start["batch_size"] == 3072  # warm-up starts at 0
    assert start["phase"] == "initial"
    assert ramped["batch_size"] == 15360 and ramped["tokens"] >= 469 * 10**9
    assert ramped["tokens"] - 469 * 10**9 < 15360 * 4096  # the first step past 469B tokens
    assert stable["lr"] == pytest.approx(2.2e-4)
    assert (stable["bias_update_speed"], stable["mtp_weight"]) == (0.001, 0.3)
    assert stable["phase"] == "stable"
    assert midpoint["lr"] == pytest.approx((2.2e-4 + 2.2e-5) / 2, rel=0.01)  # cosine midpoint
    assert midpoint["mtp_weight"] == 0.1 and midpoint["phase"] == "cosine decay"
    assert tail["lr"] == pytest.approx(2.2e-5) and tail["bias_update_speed"] == 0.0
    assert last["lr"] == pytest.approx(7.3e-6) and last["phase"] == "tail 7.3e-6"


def test_default_rows_are_every_change_point(capsys):
    config = resolve(V3).config
    ramp = batch_ramp(config)
    found = rows(capsys, V3)
    steps = [row["step"] for row in found]
    assert steps == sorted(set(steps))
    expected = {0, config.schedule.warmup_iters, config.training.max_iters}
    expected |= {stage.first_step for stage in ramp.stages}
    expected |= {segment.until for segment in config.schedule.segments}
    expected |= {config.moe.bias_update_speed_until, config.mtp.mtp_loss_weight_until}
    assert set(steps) == expected
    assert len(ramp.stages) == 9 and steps[1] == 2000  # 2K steps of warm-up
    assert [row["tokens"] for row in found] == [ramp.tokens_before(s) for s in steps]


def test_the_table_and_config_flags_before_or_after_the_config(capsys):
    code, out, _ = run(capsys, V3, "--at", "2000 steps")
    assert code == 0
    header, row = out.splitlines()[1:]
    assert header.split()[:3] == ["step", "tokens", "exact"]
    assert row.split() == ["2,000", "~25.166B", "25,165,824,000", "2.200e-04"] + [
        "3,072",
        "0.001",
        "0.3",
        "stable",
    ]
    flag = f"--{PATH.optimizer.lr}"
    for argv in ([flag, "1e-3", V3, "--at", "5T"], [V3, "--at", "5T", flag, "1e-3"]):
        assert [r["lr"] for r in rows(capsys, *argv)] == [pytest.approx(2.2e-4)]  # segment's lr
    assert rows(capsys, flag, "1e-3", V3, "--at", "1000steps")[0]["lr"] == pytest.approx(5e-4)


def test_plot_writes_a_png(capsys, tmp_path):
    path = tmp_path / "schedule.png"
    code, out, err = run(capsys, V3, "--plot", path)
    assert code == 0, err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert "stable" in out and str(path) in err
    code, _, err = run(capsys, V3, "--plot", tmp_path / "missing" / "a.png")
    assert code == console.EXIT_USAGE and "no such folder" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("item", ["5X", "tokens", "", "-3T", "1.5 steps"])
def test_a_bad_point_is_a_one_line_usage_error(capsys, item):
    code, out, err = run(capsys, V3, "--at", f"10T,{item}")
    assert code == console.EXIT_USAGE and out == ""
    assert err.count("\n") == 1 and err.startswith("schedule: error: --at:")
    assert repr(item) in err


def test_the_command_is_registered(capsys):
    assert cli.COMMANDS["schedule"] == "runtime.cli.schedule" and "schedule" in cli.USAGE
    assert "schedule" in cli.CONFIG_FLAG_PLACES
    assert cli.main(["schedule", V3, "--at", "0"]) == 0
    assert "initial" in capsys.readouterr().out
