"""What clusters do to multi-process runs, under torchrun (gloo, tiny dimensions), each in FSDP2
and in expert parallel: non-finite weights refused by every process together, one decision for
`latest` when one process cannot read a shard (transient or not), preemption that signals the
launcher and every worker, a full disk during a sharded save, and a frozen process."""

import os
import shutil
import signal
import subprocess
import time

import pytest

from helpers import ENV, REPO, losses, metrics, run_trainer, torchrun_args, trainer_args
from runtime.checkpoint.single_file import atomic_save, load_checkpoint

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("one_thread")]

LAYOUTS = {
    "fsdp2": ("--system.distributed.dp_shard", "2"),
    "ep2": ("--system.distributed.expert_parallel", "2"),
}
DIST = ("--system.distributed.enabled", "true", "--system.distributed.backend", "gloo",
        "--training.gradient_accumulation_steps", "2", "--sample.max_new_tokens", "0",
        "--evaluator.eval_interval", "1000")  # fmt: skip


def launch(out, data_dir, layout, *extra, env=None, wait=True):
    """torchrun with 2 processes of `layout`; the finished process, or the running one."""
    cmd = [*torchrun_args(2), "-m", "runtime", "train",
           *trainer_args(out, data_dir, *DIST, *LAYOUTS[layout], *extra)]  # fmt: skip
    run_env = dict(ENV, **(env or {}))
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=300)


def our_traceback(text):
    """Whether a traceback runs through this project's code (torchrun prints its own for a
    failed worker: ChildFailedError, from torch's files only)."""
    return f'File "{REPO / "runtime"}' in text


def workers(proc):
    """The worker processes torchrun started (its children running `runtime`)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if parent == proc.pid and b"runtime" in cmdline:
                found.append(int(pid))
    return sorted(found)


def wait_for_step(out, step, proc, limit=120):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        assert proc.poll() is None, proc.communicate()
        try:
            if any(r.get("iter", 0) >= step for r in metrics(out)):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {limit} s")


REF_STEPS = 12


@pytest.fixture(scope="module", params=list(LAYOUTS))
def reference(request, tmp_path_factory, data_dir):
    """An uninterrupted run of REF_STEPS steps of the layout, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp(f"ref-{request.param}")
    proc = launch(
        out,
        data_dir,
        request.param,
        "--training.max_iters",
        str(REF_STEPS),
        "--checkpointer.save_interval",
        "2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, out


def test_nonfinite_weights_are_refused_by_every_process_together(tmp_path, data_dir, reference):
    layout, _ = reference
    # a source with a NaN in the half of a weight that FSDP / EP puts on process 1 only
    run_trainer(tmp_path / "one", data_dir, "--training.max_iters", "1")
    state = load_checkpoint(str(tmp_path / "one" / "checkpoints" / "ckpt_0000001.pt"))
    name = "layers.1.ffn.experts.w2"  # (E, C, I): expert 3 lives on process 1 in both layouts
    state["model"][name][3, -1, -1] = float("nan")
    atomic_save(state, str(tmp_path / "nan.pt"))
    proc = launch(tmp_path / "o", data_dir, layout, "--checkpointer.init_from", tmp_path / "nan.pt",
                  "--training.nonfinite_loss", "skip", "--training.max_iters", "2",
                  "--checkpointer.save_interval", "2")  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "refusing to write checkpoint" in errors[0], proc.stderr[-3000:]
    assert f"model weight {name} has non-finite values" in errors[0] and "(rank 1)" in errors[0]
    assert not our_traceback(proc.stderr)
    assert not os.listdir(tmp_path / "o" / "checkpoints")  # nothing written, no temporary folder


def test_preemption_then_one_processs_read_errors_resume_exactly_and_together(
    tmp_path, data_dir, reference
):
    """SIGTERM to the launcher and every worker saves the stop step; resuming it through a
    transient read error on rank 1 gives the uninterrupted losses; when rank 1 can never read the
    newest checkpoint, every process falls back to the one before, together."""
    layout, ref = reference
    flags = ("--training.max_iters", str(REF_STEPS), "--checkpointer.save_interval", "2",
             "--checkpointer.keep_last_n", "5")  # fmt: skip
    proc = launch(
        tmp_path / "o", data_dir, layout, *flags, "--training.max_iters", "200", wait=False
    )
    wait_for_step(tmp_path / "o", 4, proc)
    pids = workers(proc)
    assert len(pids) == 2
    for pid in [proc.pid, *pids]:  # what Slurm does at preemption: everyone gets SIGTERM
        os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # the launcher itself exits 1 (torchrun raises SignalException); the workers saved and exited 0
    assert "stopped after step" in out and "saved" in out, err[-3000:]
    assert not our_traceback(out + err)
    stopped = max(r["iter"] for r in metrics(tmp_path / "o"))
    assert os.path.isdir(tmp_path / "o" / "checkpoints" / f"ckpt_{stopped:07d}")
    if stopped >= REF_STEPS:
        pytest.skip(f"the run passed step {REF_STEPS} before the signal arrived")
    shutil.copytree(tmp_path / "o", tmp_path / "p")
    resume = ("--checkpointer.resume_from", "latest")
    # transient: one failed read on process 1 is tried again; both resume the stop step
    flaky = {"DEEPSEEK_MOE_READ_ERRORS": "1", "DEEPSEEK_MOE_FAULT_RANKS": "1"}
    done = launch(tmp_path / "o", data_dir, layout, *flags, *resume, env=flaky)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and f"ckpt_{stopped:07d} at step {stopped}" in done.stdout
    assert losses(tmp_path / "o") == losses(ref)
    # persistent: process 1 cannot read the newest; every process falls back together
    before = (stopped - 1) // 2 * 2
    broken = {
        "DEEPSEEK_MOE_READ_ERRORS": f"ckpt_{stopped:07d}:1000",
        "DEEPSEEK_MOE_FAULT_RANKS": "1",
    }
    done = launch(tmp_path / "p", data_dir, layout, *flags, *resume, env=broken)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert f"ckpt_{stopped:07d}" in said and "(rank 1)" in said, said[-3000:]
    assert f"ckpt_{before:07d} at step {before}" in done.stdout
    assert losses(tmp_path / "p") == losses(ref)


def test_a_full_disk_during_a_sharded_save_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, data_dir, reference
):
    layout, ref = reference
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    size = sum(f.stat().st_size for f in (ref / "checkpoints" / f"ckpt_{REF_STEPS:07d}").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6)}", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        proc = launch(tmp_path / "o", data_dir, layout, "--training.max_iters", "4",
                      "--checkpointer.save_interval", "2", "--checkpointer.save_dir", disk)  # fmt: skip
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and not our_traceback(proc.stderr), proc.stderr[-3000:]
        assert "No space left on device (ENOSPC)" in errors[0] and str(disk) in errors[0]
        assert sorted(os.listdir(disk)) == ["ckpt_0000002"]  # the partial folder is gone
        assert (disk / "ckpt_0000002" / "COMPLETE").is_file()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_frozen_process_ends_the_job_within_the_timeout_naming_it(tmp_path, data_dir, reference):
    layout, _ = reference
    timeout = 6
    proc = launch(tmp_path / "o", data_dir, layout, "--training.max_iters", "500", "--checkpointer.save_interval", "0",
                  "--system.distributed.timeout", str(timeout), wait=False)  # fmt: skip
    wait_for_step(tmp_path / "o", 2, proc)
    healthy, frozen = workers(proc)
    os.kill(frozen, signal.SIGSTOP)
    start = time.monotonic()
    try:  # the healthy process ends itself; torchrun would SIGKILL the frozen one 30 s later
        while os.path.exists(f"/proc/{healthy}") and time.monotonic() - start < timeout + 60:
            time.sleep(0.2)
        ended = time.monotonic() - start
    finally:
        os.kill(frozen, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert ended < timeout + 30, f"the healthy process ran on for {ended:.0f} s"
    assert proc.returncode != 0
    stuck = [line for line in err.splitlines() if "stuck: rank 1" in line]
    # rank 0's collective gives up, or its watchdog fires, whichever first: either names rank 1
    assert stuck and "stuck: rank 1 (silent for" in stuck[0], err[-3000:]
    assert f"system.distributed.timeout = {timeout} s" in stuck[0]
    assert not our_traceback(err), err[-3000:]
