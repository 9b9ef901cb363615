"""Fault tolerance: SIGKILL at any moment, preemption signals, damaged or foreign
checkpoints, non-finite numbers, disk trouble.

Kills at precise points use the test-only hook of runtime/utils/faults.py: DEEPSEEK_MOE_FAULT=phase:N
makes the trainer SIGKILL itself the N-th time it reaches `phase` (step, eval, checkpoint_write,
checkpoint_rename)."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from generated.parser import ConfigError, load_config
from helpers import ENV, PYTHON, REPO, run_trainer, trainer_args
from runtime.checkpoint import single_file as ckpt_mod
from runtime.checkpoint.format import CheckpointError, checkpoint_name, step_checkpoints
from runtime.checkpoint.single_file import TEMP_FILE, TRAILER_LEN, atomic_save, load_checkpoint
from runtime.cli.train import main
from runtime.components.metrics import VOLATILE_KEYS, MetricsWriter, read_metrics
from runtime.trainer.trainer import Trainer
from runtime.utils import faults
from runtime.utils.faults import FAULT_ENV, FAULT_PHASES

LAUNCH_ENV = dict(ENV, PYTHONUNBUFFERED="1")  # the tests read a launch's output while it runs
MAX_ITERS = 48
# eval every 3 steps, a step checkpoint every 2 (and best.pt after improving evaluations): kills land
# at every relative position of steps, evaluations and writes
CHAIN = (
    "--training.max_iters",
    str(MAX_ITERS),
    "--evaluator.eval_interval",
    "3",
    "--checkpointer.save_interval",
    "2",
    "--checkpointer.keep_last_n",
    "2",
    "--checkpointer.resume_from",
    "latest",
)
TRAINING = re.compile(rb"training steps \d+")  # logged once the loop (and its signal handlers) runs


pytestmark = pytest.mark.usefixtures("one_thread")


class Launch:
    """`python -m runtime train` in a subprocess, its output in files next to the run's folder."""

    count = 0

    def __init__(self, out, data_dir, fault=None, extra=()):
        Launch.count += 1
        base = f"{out}.{Launch.count}"
        self.stdout_path, self.stderr_path = base + ".out", base + ".err"
        env = dict(LAUNCH_ENV, **({FAULT_ENV: fault} if fault else {}))
        cmd = [PYTHON, "-m", "runtime", "train", *trainer_args(out, data_dir, *CHAIN, *extra)]
        with open(self.stdout_path, "wb") as so, open(self.stderr_path, "wb") as se:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=so, stderr=se, env=env)

    def wait(self, timeout=120):
        return self.proc.wait(timeout=timeout)

    def stdout(self):
        with open(self.stdout_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stderr(self):
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for_training(self, timeout=120):
        """Until the loop says it runs (its signal handlers are installed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with open(self.stdout_path, "rb") as f:
                if TRAINING.search(f.read()):
                    return
            time.sleep(0.01)
        assert self.proc.poll() is None, (
            f"exited {self.proc.returncode} before training: {self.stderr()[-2000:]}"
        )
        raise AssertionError("training did not start")

    def resumed_step(self):
        found = re.findall(r"resumed from \S+ at step (\d+)", self.stdout())
        return int(found[0]) if found else None


def complete_checkpoints(out):
    """Steps of the step checkpoints in the folder, each checked to load (never a half-written one)."""
    found = step_checkpoints(os.path.join(out, "checkpoints"))
    for step, path in found:
        assert load_checkpoint(path)["step"] == step
    return [step for step, _ in found]


def temp_files(out):
    folder = os.path.join(out, "checkpoints")
    return [n for n in os.listdir(folder) if TEMP_FILE.match(n)] if os.path.isdir(folder) else []


def clean(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE_KEYS} for r in records]


def run_metrics(out):
    return clean(read_metrics(os.path.join(out, "metrics.jsonl")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run of the CHAIN settings."""
    out = tmp_path_factory.mktemp("reference") / "run"
    launch = Launch(str(out), data_dir)
    assert launch.wait() == 0, launch.stderr()[-3000:]
    records = run_metrics(out)
    assert [r["iter"] for r in records if "loss" in r] == list(range(1, MAX_ITERS + 1))
    return records


# ---------------------------------------------------------------------------------------------
# SIGKILL at any moment


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_at_any_moment_then_resume_latest_matches_an_uninterrupted_run(
    tmp_path, data_dir, reference
):
    rng = random.Random(20240505)
    phases = [*FAULT_PHASES] * 2 + rng.choices(sorted(FAULT_PHASES), k=3)
    rng.shuffle(phases)
    points = [(phase, rng.randint(1, 3)) for phase in phases]  # 11 kills; each advances <= 4 steps
    out = str(tmp_path / "run")
    for phase, count in points:
        before = complete_checkpoints(out)
        launch = Launch(out, data_dir, fault=f"{phase}:{count}")
        rc = launch.wait()
        assert rc == -signal.SIGKILL, (
            f"{phase}:{count}: exit {rc}, not killed\n{launch.stderr()[-2000:]}"
        )
        # it resumed from the newest complete checkpoint (none: a fresh start)
        assert launch.resumed_step() == (before[-1] if before else None), (phase, count, before)
        assert not temp_files(out) or phase.startswith(
            "checkpoint"
        )  # earlier leftovers were removed
        if phase.startswith("checkpoint"):
            assert temp_files(out), (
                f"{phase}:{count} left no partial file: the kill was not mid-write"
            )
    # and a few kills from outside, at whatever moment the clock says
    for _ in range(3):
        before = complete_checkpoints(out)
        launch = Launch(out, data_dir)
        launch.wait_for_training()
        time.sleep(rng.uniform(0.0, 0.6))
        launch.proc.send_signal(signal.SIGKILL)
        rc = launch.wait()
        assert launch.resumed_step() == (before[-1] if before else None)
        if rc == 0:  # it had already finished
            break
        assert rc == -signal.SIGKILL
    before = complete_checkpoints(out)
    final = Launch(out, data_dir)
    assert final.wait() == 0, final.stderr()[-3000:]
    assert final.resumed_step() == before[-1]
    assert not temp_files(out)
    assert complete_checkpoints(out)[-1] == MAX_ITERS
    # metrics.jsonl reads exactly like the uninterrupted run's: no duplicates or stale lines
    assert run_metrics(out) == reference


# ---------------------------------------------------------------------------------------------
# preemption


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_preemption_signal_finishes_the_step_saves_and_exits_0(tmp_path, data_dir, reference, sig):
    out = str(tmp_path / "run")
    launch = Launch(out, data_dir)
    launch.wait_for_training()
    launch.proc.send_signal(sig)
    assert launch.wait() == 0, launch.stderr()[-3000:]
    found = re.findall(rf"{sig.name}: stopped after step (\d+), saved (\S+);", launch.stdout())
    assert found, launch.stdout()[-2000:]
    stopped = int(found[0][0])
    assert 0 < stopped < MAX_ITERS
    assert found[0][1].endswith(checkpoint_name(stopped))
    assert complete_checkpoints(out)[-1] == stopped
    assert [r["iter"] for r in run_metrics(out) if "loss" in r][-1] == stopped
    assert not os.path.exists(os.path.join(out, "sample.txt"))
    resumed = Launch(out, data_dir)
    assert resumed.wait() == 0, resumed.stderr()[-3000:]
    assert resumed.resumed_step() == stopped
    assert run_metrics(out) == reference


# ---------------------------------------------------------------------------------------------
# damaged, foreign and hostile checkpoints


SMALL = (
    "--checkpointer.save_interval",
    "1",
    "--checkpointer.keep_last_n",
    "0",
    "--evaluator.eval_interval",
    "2",
)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("good")
    run_trainer(out, data_dir, "--training.max_iters", "1", *SMALL)
    return str(out / "checkpoints" / checkpoint_name(1))


def test_truncated_or_flipped_checkpoints_are_refused_naming_the_file(tmp_path, good_checkpoint):
    with open(good_checkpoint, "rb") as f:
        data = f.read()
    assert load_checkpoint(good_checkpoint)["step"] == 1
    rng = random.Random(7)
    size = len(data)
    path = str(tmp_path / "bad.pt")
    for cut in [0, 1, 64, size // 2, size - TRAILER_LEN - 1, size - 1, *rng.sample(range(size), 8)]:
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path)
        assert path in str(error.value) and re.search("truncated|checksum", str(error.value)), cut
    for offset in [0, size - 1, size - 30, *rng.sample(range(size), 24)]:
        flipped = bytearray(data)
        flipped[offset] ^= 1 << rng.randrange(8)
        with open(path, "wb") as f:
            f.write(flipped)
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path)
        assert path in str(error.value) and re.search("checksum|damaged", str(error.value)), offset
    # a plain torch.save file has no checksum: refused too
    torch.save(torch.load(good_checkpoint, weights_only=True), path)
    with pytest.raises(CheckpointError, match="no checksum trailer"):
        load_checkpoint(path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickled_arbitrary_object_is_never_unpickled(tmp_path):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "ckpt_0000001.pt")
    atomic_save({"model": {}, "step": 1, "extra": Payload(marker)}, path)  # a valid checksum
    with pytest.raises(CheckpointError, match="refused") as error:
        load_checkpoint(path)
    assert path in str(error.value)
    assert not os.path.exists(marker)


def test_latest_falls_back_past_damaged_checkpoints_with_a_warning(tmp_path, data_dir, capsys):
    run_trainer(tmp_path / "full", data_dir, "--training.max_iters", "6", *SMALL)
    out = tmp_path / "part"
    run_trainer(out, data_dir, "--training.max_iters", "4", *SMALL)
    folder = out / "checkpoints"
    with open(folder / checkpoint_name(4), "r+b") as f:  # a flipped byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x10]))
    with open(folder / checkpoint_name(3), "r+b") as f:  # truncated
        f.truncate(os.path.getsize(folder / checkpoint_name(3)) // 2)
    # the config no longer hashes to its recorded hash (written with a valid file checksum)
    state = load_checkpoint(str(folder / checkpoint_name(2)))
    state["config"]["training"]["max_iters"] = 99
    atomic_save(state, str(folder / checkpoint_name(2)))
    with pytest.raises(CheckpointError, match="config does not match its recorded hash") as error:
        load_checkpoint(str(folder / checkpoint_name(2)))
    assert str(folder / checkpoint_name(2)) in str(error.value)
    # an explicit file is an error naming it; `latest` warns and takes ckpt 1
    with pytest.raises(CheckpointError, match="checksum mismatch") as error:
        Trainer(
            load_config(
                argv=trainer_args(
                    out, data_dir, "--checkpointer.resume_from", str(folder / checkpoint_name(4))
                )
            )
        )
    assert checkpoint_name(4) in str(error.value)
    capsys.readouterr()
    resumed = run_trainer(
        out, data_dir, "--training.max_iters", "6", "--checkpointer.resume_from", "latest", *SMALL
    )
    assert resumed.resumed_from.endswith(checkpoint_name(1))
    warnings = [
        line for line in capsys.readouterr().err.splitlines() if "warning: checkpoint" in line
    ]
    assert len(warnings) == 3
    for step, problem in ((4, "checksum mismatch"), (3, "truncated"), (2, "recorded hash")):
        assert any(checkpoint_name(step) in w and problem in w for w in warnings), (step, warnings)
    assert run_metrics(out) == run_metrics(tmp_path / "full")
    # when every step checkpoint is damaged, `latest` is an error, not a silent fresh start
    for _, path in step_checkpoints(str(folder)):
        with open(path, "r+b") as f:
            f.truncate(100)
    with pytest.raises(CheckpointError, match="none of the 6 step checkpoints"):
        Trainer(
            load_config(argv=trainer_args(out, data_dir, "--checkpointer.resume_from", "latest"))
        )


def test_foreign_checkpoints_are_clear_errors(tmp_path, data_dir, good_checkpoint):
    # another architecture: the config error names the field, both values and the file
    other = tmp_path / "other"
    run_trainer(other, data_dir, "--training.max_iters", "1", "--model.dim", "48")
    out = tmp_path / "run"
    os.makedirs(out / "checkpoints")
    shutil.copy(
        other / "checkpoints" / checkpoint_name(1), out / "checkpoints" / checkpoint_name(1)
    )
    with pytest.raises(ConfigError) as error:
        Trainer(
            load_config(argv=trainer_args(out, data_dir, "--checkpointer.resume_from", "latest"))
        )
    assert "model.dim" in str(error.value) and str(out / "checkpoints" / checkpoint_name(1)) in str(
        error.value
    )
    # weights that do not fit their own config (intact file): named tensor and shapes
    state = load_checkpoint(good_checkpoint)
    key = next(k for k, v in state["model"].items() if v.ndim == 2)
    state["model"][key] = torch.zeros(3, 5)
    path = str(tmp_path / "odd.pt")
    atomic_save(state, path)
    for flag in ("--checkpointer.resume_from", "--checkpointer.init_from"):
        with pytest.raises(CheckpointError) as error:
            Trainer(load_config(argv=trainer_args(tmp_path / "x", data_dir, flag, path)))
        assert path in str(error.value) and key in str(error.value) and "[3, 5]" in str(error.value)


# ---------------------------------------------------------------------------------------------
# numerical faults


class InfGrad(torch.autograd.Function):
    """Identity forward (finite loss), infinite gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def poison_from_step(monkeypatch, index, how):
    """From optimizer step `index` (0-based) on, the loss is made inf / NaN, or its gradients inf."""
    real = Trainer.train_step

    def train_step(self, step, micro):
        if step >= index and not getattr(self, "_poisoned", False):
            real_loss = self.loss

            def loss(model, window, s):
                out = real_loss(model, window, s)
                out.loss = InfGrad.apply(out.loss) if how == "grad" else out.loss * float(how)
                return out

            self.loss, self._poisoned = loss, True
        return real(self, step, micro)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize(
    "how,what",
    [
        ("inf", "non-finite loss (inf)"),
        ("nan", "non-finite loss (nan)"),
        ("grad", "non-finite gradient norm"),
    ],
)
def test_nonfinite_stops_naming_the_step_and_saves_nothing_after(
    tmp_path, data_dir, monkeypatch, capsys, how, what
):
    poison_from_step(monkeypatch, 2, how)
    out = tmp_path / "o"
    assert main(trainer_args(out, data_dir, "--training.max_iters", "4", *SMALL)) == 1
    err = capsys.readouterr().err
    assert (
        re.search(rf"^train: error: {re.escape(what)}.* at step 3; ", err, re.M)
        and "Traceback" not in err
    )
    assert complete_checkpoints(out) == [1, 2]


def test_nonfinite_skip_drops_the_steps(tmp_path, data_dir, monkeypatch):
    poison_from_step(monkeypatch, 2, "grad")
    out = tmp_path / "o"
    trainer = run_trainer(
        out, data_dir, "--training.max_iters", "4", "--training.nonfinite_loss", "skip", *SMALL
    )
    assert [r.get("skipped", False) for r in run_metrics(out) if "loss" in r] == [
        False,
        False,
        True,
        True,
    ]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert complete_checkpoints(out) == [1, 2, 3, 4]


def test_a_checkpoint_with_nonfinite_weights_is_never_written(
    tmp_path, data_dir, monkeypatch, capsys
):
    real = Trainer.train_step

    def train_step(self, step, micro):
        metrics = real(self, step, micro)
        if step == 1:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))  # the embedding: NaN val loss too
        return metrics

    monkeypatch.setattr(Trainer, "train_step", train_step)
    out = tmp_path / "o"
    assert main(trainer_args(out, data_dir, "--training.max_iters", "3", *SMALL)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "refusing to write checkpoint" in lines[0] and checkpoint_name(2) in lines[0]
    assert "non-finite" in lines[0] and "step 2" in lines[0]
    assert complete_checkpoints(out) == [1] and not temp_files(out)


# ---------------------------------------------------------------------------------------------
# disk trouble


def test_disk_full_during_a_save_is_one_clear_line_and_keeps_the_old_checkpoints(
    tmp_path, data_dir, monkeypatch, capsys
):
    real_save = torch.save
    calls = []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *a, **k)
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    out = tmp_path / "o"
    flags = (
        "--training.max_iters",
        "4",
        "--checkpointer.save_interval",
        "2",
        "--checkpointer.save_best",
        "false",
    )
    assert main(trainer_args(out, data_dir, *flags)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train: error:")]
    assert "Traceback" not in err and len(lines) == 1
    assert str(out / "checkpoints" / checkpoint_name(4)) in lines[0]
    assert "No space left on device (ENOSPC)" in lines[0]
    assert os.listdir(out / "checkpoints") == [checkpoint_name(2)]  # no temp file left
    assert load_checkpoint(str(out / "checkpoints" / checkpoint_name(2)))["step"] == 2


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path, data_dir, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    folder = blocker / "sub"  # not writable even by root
    assert (
        main(
            trainer_args(
                tmp_path / "o",
                data_dir,
                "--training.max_iters",
                "2",
                "--checkpointer.save_dir",
                str(folder),
            )
        )
        == 1
    )
    err = "".join(
        line for line in capsys.readouterr().err.splitlines(True) if "warning: schedule" not in line
    )
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (
        err.startswith("train: error: cannot write checkpoints to")
        and str(folder) in err
        and "ENOTDIR" in err
    )
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------
# small pieces


def test_metrics_truncation_drops_a_torn_last_line_only(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for i in (1, 2, 3):
        writer.write({"iter": i, "loss": float(i)})
    with open(writer.path, "a") as f:
        f.write('{"iter": 4, "lo')  # killed mid-line
    writer.truncate_after(2)
    assert read_metrics(writer.path) == [{"iter": 1, "loss": 1.0}, {"iter": 2, "loss": 2.0}]
    with open(writer.path, "a") as f:
        f.write('{"iter": 3, "lo\n{"iter": 3}\n')  # damage in the middle is not silently dropped
    with pytest.raises(json.JSONDecodeError):
        writer.truncate_after(2)


def test_fault_spec_is_validated(monkeypatch):
    monkeypatch.setattr(faults, "_fault_plan", None)
    monkeypatch.setenv(FAULT_ENV, "stepp:1")
    with pytest.raises(ValueError, match="DEEPSEEK_MOE_FAULT"):
        faults.fault_point("step")
    monkeypatch.setattr(faults, "_fault_plan", None)
    monkeypatch.setenv(FAULT_ENV, "eval:2")
    faults.fault_point("eval")  # the first time: nothing happens
    assert faults._fault_plan == {"eval": 1}
