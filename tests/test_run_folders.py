"""Run folders, logs and schedules that follow the run: one run per out_dir (unless --overwrite),
`latest` resumes only the folder's own run, files follow the umask, a bar only on a terminal, and
lr_decay_iters defaults to training.max_iters with warnings when a schedule does not fit."""

import io
import json
import os
import stat

import pytest

from generated.config import LRScheduleConfig
from generated.parser import ConfigError, load_config
from helpers import TINY_RUN_FLAGS, metrics, run_trainer, trainer_args
from runtime.checkpoint.single_file import load_checkpoint
from runtime.cli.train import main
from runtime.components.data.errors import DataError
from runtime.components.lr_schedule import lr_at, schedule_warnings
from runtime.trainer.trainer import Trainer

# short evaluations, a log line every step, and two steps unless a test says otherwise
FLAGS = TINY_RUN_FLAGS + [
    "--evaluator.eval_iters",
    "1",
    "--schedule.warmup_iters",
    "1",
    "--training.log_interval",
    "1",
    "--training.max_iters",
    "2",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def args(out_dir, data_dir, *extra):
    return trainer_args(out_dir, data_dir, *extra, flags=FLAGS)


def run(out_dir, data_dir, *extra):
    return run_trainer(out_dir, data_dir, *extra, flags=FLAGS)


def test_second_run_into_a_used_folder_is_a_config_error(tmp_path, data_dir, capsys):
    out = tmp_path / "o"
    first = run(out, data_dir)
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(args(out, data_dir, "--training.max_iters", "1")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{out} holds the files of run {first.run_id}" in err
    assert "--overwrite" in err and "resume_from latest" in err
    assert (out / "metrics.jsonl").read_bytes() == before  # untouched
    assert sorted(os.listdir(out / "checkpoints")) == ["best.pt", "ckpt_0000002.pt"]
    # --overwrite (bare, as a switch) deletes the old run's files and starts a new run
    assert (
        main(
            args(
                out,
                data_dir,
                "--training.max_iters",
                "1",
                "--checkpointer.save_best",
                "false",
                "--overwrite",
            )
        )
        == 0
    )
    second = json.loads((out / "run.json").read_text())["run_id"]
    assert second != first.run_id
    assert {r["run_id"] for r in metrics(out)} == {second} and max(
        r["iter"] for r in metrics(out)
    ) == 1
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt_0000001.pt"]
    assert first.run_id not in (out / "train.log").read_text()


def test_a_failed_launch_does_not_claim_the_folder(tmp_path, data_dir):
    out = tmp_path / "o"
    missing = str(tmp_path / "missing")
    with pytest.raises(DataError, match="existing folder"):  # after run.json and train.log
        Trainer(
            load_config(
                argv=args(out, data_dir, "--data.dataset", "text_dir", "--data.path", missing)
            )
        )
    assert (out / "run.json").exists()
    run(out, data_dir)  # no metrics or checkpoints were left: the fixed launch may start


def test_latest_resumes_only_the_folders_run(tmp_path, data_dir, capsys):
    shared = str(tmp_path / "ckpts")  # two out_dirs sharing one checkpoint folder
    a = run(
        tmp_path / "a",
        data_dir,
        "--checkpointer.save_dir",
        shared,
        "--checkpointer.save_best",
        "false",
    )
    assert load_checkpoint(os.path.join(shared, "ckpt_0000002.pt"))["run_id"] == a.run_id
    # b starting fresh would mix with a's checkpoints
    with pytest.raises(ConfigError, match="holds the files of"):
        Trainer(load_config(argv=args(tmp_path / "b", data_dir, "--checkpointer.save_dir", shared)))
    # b's folder says run X: a's checkpoints are skipped, with a warning each, and not resumed
    (tmp_path / "b").mkdir(exist_ok=True)
    (tmp_path / "b" / "run.json").write_text('{"run_id": "someoneelse"}')
    capsys.readouterr()
    with pytest.raises(Exception, match="none of the 1 step checkpoints") as error:
        Trainer(
            load_config(
                argv=args(
                    tmp_path / "b",
                    data_dir,
                    "--checkpointer.save_dir",
                    shared,
                    "--checkpointer.resume_from",
                    "latest",
                )
            )
        )
    assert f"belongs to run {a.run_id}, not to run someoneelse" in str(error.value)
    # a's own folder resumes it, keeps its id and its metrics continue
    resumed = run(
        tmp_path / "a",
        data_dir,
        "--checkpointer.save_dir",
        shared,
        "--checkpointer.resume_from",
        "latest",
        "--training.max_iters",
        "3",
    )
    assert resumed.step == 3 and resumed.run_id == a.run_id
    assert {r["run_id"] for r in metrics(tmp_path / "a")} == {a.run_id}
    assert [r["elapsed_s"] for r in metrics(tmp_path / "a")] == sorted(
        r["elapsed_s"] for r in metrics(tmp_path / "a")
    )


def test_resume_latest_before_the_first_checkpoint_restarts_the_same_run(tmp_path, data_dir):
    out = tmp_path / "o"
    first = run(out, data_dir, "--checkpointer.save_best", "false")
    for name in os.listdir(out / "checkpoints"):  # as if killed before the first save
        os.unlink(out / "checkpoints" / name)
    again = run(out, data_dir, "--checkpointer.resume_from", "latest")
    assert again.resumed_from is None and again.run_id == first.run_id
    assert [r["iter"] for r in metrics(out) if "loss" in r] == [1, 2]  # started over, no duplicates


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, data_dir, umask):
    old = os.umask(umask)
    try:
        run(tmp_path / "o", data_dir)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for path in [
        tmp_path / "o" / "checkpoints" / "ckpt_0000002.pt",
        tmp_path / "o" / "checkpoints" / "best.pt",
        tmp_path / "o" / "run.json",
        tmp_path / "o" / "metrics.jsonl",
    ]:
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, path


def test_progress_bar_only_on_a_terminal(tmp_path, data_dir, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    run(tmp_path / "tty", data_dir)
    assert "\r" in terminal.getvalue() and "tok_s=" in terminal.getvalue()  # tqdm's bar
    out = capsys.readouterr().out
    assert "step 2/2 | loss" in out  # the log lines still come, above the bar
    monkeypatch.undo()
    run(tmp_path / "pipe", data_dir)
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err and "step 2/2 | loss" in captured.out


# --- schedules that follow the run -----------------------------------------------------------------


def schedule(*argv):
    """The schedule section of a resolved config (lr_decay_iters is a derived default)."""
    return load_config(argv=list(argv)).schedule


def test_lr_decay_iters_follows_max_iters(tmp_path, data_dir):
    assert LRScheduleConfig().lr_decay_iters is None  # spec default: null, derived when resolved
    resolved = schedule(
        "--schedule.warmup_iters", "2", "--schedule.min_lr", "0", "--training.max_iters", "30"
    )
    assert resolved.lr_decay_iters == 30
    assert lr_at(29, resolved, 1.0) > 0 and lr_at(30, resolved, 1.0) == 0.0
    assert (
        schedule("--schedule.lr_decay_iters", "7", "--schedule.warmup_iters", "2").lr_decay_iters
        == 7
    )  # explicit wins
    assert (
        schedule("--training.max_iters", "0", "--schedule.warmup_iters", "3").lr_decay_iters == 3
    )  # never before warm-up ends
    with pytest.raises(ValueError, match="derived default"):
        lr_at(3, LRScheduleConfig(), 1.0)
    trainer = Trainer(load_config(argv=args(tmp_path / "o", data_dir, "--training.max_iters", "5")))
    assert trainer.lr_schedule.schedule.lr_decay_iters == 5


def test_schedule_that_does_not_fit_the_run_warns(tmp_path, data_dir, capsys):
    # a 30-step run with the default 50 warm-up steps never leaves warm-up
    warnings = schedule_warnings(schedule("--training.max_iters", "30"), 30)
    assert len(warnings) == 1 and "never leaves warm-up" in warnings[0]
    ends_early = schedule_warnings(LRScheduleConfig(warmup_iters=5, lr_decay_iters=20), 30)
    assert len(ends_early) == 1 and "the last 10 steps run at min_lr" in ends_early[0]
    ends_late = schedule_warnings(LRScheduleConfig(warmup_iters=5, lr_decay_iters=100), 30)
    assert len(ends_late) == 1 and "ends before the decay reaches min_lr" in ends_late[0]
    assert (
        schedule_warnings(
            schedule("--schedule.warmup_iters", "5", "--training.max_iters", "30"), 30
        )
        == []
    )
    assert (
        schedule_warnings(
            LRScheduleConfig(warmup_iters=5, lr_decay_iters=100, schedule_type="constant"), 30
        )
        == []
    )
    # the trainer says so on stderr and in train.log
    Trainer(load_config(argv=args(tmp_path / "o", data_dir, "--schedule.warmup_iters", "50")))
    err = capsys.readouterr().err
    assert "warning: schedule.warmup_iters (50) >= training.max_iters (2)" in err
    assert "never leaves warm-up" in (tmp_path / "o" / "train.log").read_text()
