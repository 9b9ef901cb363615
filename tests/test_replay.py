"""Skipped batches (data.skip_steps) and `deepseek-moe data replay`: what a step reads after a
skip, that replay prints what the trainer trains on, the metrics and log of a skipping run, and
resuming across a skip."""

import json
import subprocess

import pytest
import torch

from generated.parser import load_config
from helpers import ENV, PYTHON, REPO, losses, metrics, run_trainer, trainer_args
from runtime.checkpoint.format import checkpoint_name
from runtime.checkpoint.single_file import load_checkpoint
from runtime.cli.main import main
from runtime.cli.replay import replay
from runtime.components.data.errors import DataError
from runtime.components.data.module import DataModule

pytestmark = pytest.mark.usefixtures("one_thread")

# a ramp 2 -> 8 sequences by 2 over 384 tokens (steps 1-4 read 2, 5-6 four, 7-8 six, then eight)
RAMP = (
    "--training.gradient_accumulation_steps", "4", "--training.batch_size_start", "2",
    "--training.batch_size_rampup", "384",
)  # fmt: skip
# on two processes every stage must be whole micro-batches per process: 4 -> 8 by 4 over 256 tokens
# (steps 1-4 read 4 sequences, then eight)
RAMP_2 = (*RAMP, "--training.batch_size_start", "4", "--training.batch_size_increment", "4",
          "--training.batch_size_rampup", "256")  # fmt: skip


def config(data_dir, *extra):
    return load_config(argv=trainer_args("unused", data_dir, *RAMP, *extra))


def tokens(result):
    """Every process's micro-batches of a replay: lists of token-id rows."""
    return [
        [s["tokens"] for s in m["samples"]] for r in result["ranks"] for m in r["micro_batches"]
    ]


def test_a_skipped_range_moves_the_later_steps_to_the_batches_after_it(data_dir):
    plain = config(data_dir)
    skipping = config(data_dir, "--data.skip_steps", '["5-6"]')
    for step in range(1, 5):  # before the range: unchanged
        assert tokens(replay(skipping, step)) == tokens(replay(plain, step))
    for step in (5, 6, 9):  # from it on: the batch two steps later, whole (its ramp size too)
        moved, later = replay(skipping, step), replay(plain, step + 2)
        assert tokens(moved) == tokens(later)
        assert moved["batch"] == step + 2 and moved["skipped_batches"] == 2
        assert moved["global_batch"] == later["global_batch"]
    assert replay(skipping, 5)["global_batch"] == 6  # batch 7's size, not step 5's 4
    # processes: each its own micro-batches, together the single process's step
    skipping = config(data_dir, *RAMP_2, "--data.skip_steps", '["5-6"]')
    two = replay(skipping, 5, world=2)
    assert [len(r["micro_batches"]) for r in two["ranks"]] == [2, 2]
    assert tokens(two) == tokens(replay(skipping, 5))
    assert tokens(replay(skipping, 5, world=2, ranks=[1])) == tokens(two)[2:]
    with pytest.raises(DataError, match="overlap"):
        replay(config(data_dir, "--data.skip_steps", '["5-6", "6"]'), 1)


def test_replay_prints_what_the_trainer_trains_on(tmp_path, data_dir, monkeypatch):
    consumed = []
    train_steps = DataModule.train_steps

    def recording(self, end_step):
        for micro in train_steps(self, end_step):
            consumed.append([window.tolist() for window in micro])
            yield micro

    monkeypatch.setattr(DataModule, "train_steps", recording)
    skip = ("--data.skip_steps", '["2-3"]')
    out = tmp_path / "run"
    run_trainer(out, data_dir, *RAMP, *skip, "--training.max_iters", "5",
                "--evaluator.eval_interval", "5", "--checkpointer.save_interval", "0")  # fmt: skip
    monkeypatch.undo()  # replay reads through train_steps too
    assert len(consumed) == 5
    cfg = config(data_dir, *skip)
    for step, micro in enumerate(consumed, start=1):
        assert tokens(replay(cfg, step)) == micro, step
    # the rows count the trained tokens only, and the skipped batches
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["batch_size"] for r in rows] == [2, 2, 4, 4, 6]  # batches 1, 4, 5, 6, 7
    assert [r["tokens"] for r in rows] == [32, 64, 128, 192, 288]
    assert [r.get("skipped_batches") for r in rows] == [None, 2, 2, 2, 2]
    log = (out / "train.log").read_text()
    assert "data.skip_steps: skipping at step 2 batches 2-3" in log
    assert "step 2: skipped batches 2-3 (data.skip_steps); it reads batch 4" in log


def test_replay_command_line(tmp_path, data_dir, capsys):
    argv = ["data", "replay", *trainer_args(tmp_path, data_dir, *RAMP_2), "--step", "6",
            "--data.skip_steps", "5", "--world", "2", "--rank", "1"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch"] == 7 and result["global_batch"] == 8 and result["sample_ids"] == [32, 39]
    assert [r["rank"] for r in result["ranks"]] == [1]
    ids = [s["id"] for m in result["ranks"][0]["micro_batches"] for s in m["samples"]]
    assert ids == [36, 37, 38, 39]
    assert all(len(s["text"]) for m in result["ranks"][0]["micro_batches"] for s in m["samples"])
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("step 6: batch 7 (1 batch skipped so far), 8 sequences of 18 tokens")
    assert "rank 1 micro-batch 0:\n  sample 36: " in text
    with pytest.raises(SystemExit) as usage:
        main(["data", "replay", "--step", "0"])
    assert usage.value.code == 2 and "--step" in capsys.readouterr().err
    # `data prepare` forks workers: the data command loads torch for replay only
    check = "import sys, runtime.cli.data; assert 'torch' not in sys.modules"
    subprocess.run([PYTHON, "-c", check], cwd=REPO, env=ENV, check=True)


def test_resuming_across_a_skip_is_exact(tmp_path, data_dir):
    common = (*RAMP, "--data.skip_steps", '["3-4"]', "--evaluator.eval_interval", "2",
              "--checkpointer.save_interval", "2")  # fmt: skip
    run_trainer(tmp_path / "full", data_dir, *common, "--training.max_iters", "6")
    part = tmp_path / "part"
    run_trainer(part, data_dir, *common, "--training.max_iters", "2")
    resumed = run_trainer(part, data_dir, *common, "--training.max_iters", "6",
                          "--checkpointer.resume_from", "latest")  # fmt: skip
    assert resumed.resumed_from.endswith(checkpoint_name(2))
    for key in ("loss", "grad_norm", "tokens", "batch_size", "skipped_batches", "val_loss"):
        assert losses(part, key) == losses(tmp_path / "full", key), key
    assert losses(part, "skipped_batches") == [2, 2, 2, 2]
    a, b = (load_checkpoint(str(out / "checkpoints" / checkpoint_name(6)))["model"]
            for out in (part, tmp_path / "full"))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
