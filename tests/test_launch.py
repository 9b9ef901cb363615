"""`deepseek-moe launch`: the torchrun commands per node and the Slurm script, checked against the
layout; the script's preemption handling driven with stand-in srun / scontrol; and two "nodes" on
loopback running the printed commands, whose losses are one process's (DDP and FSDP2), and a killed
node that ends the other within the timeout."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from helpers import ENV, REPO, free_port, losses, metrics, run_trainer, trainer_args
from runtime.cli.launch import main as launch_main

CONFIG = "configs/tiny.yaml"


def launch(capsys, *args):
    code = launch_main([CONFIG, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_slurm_script_has_the_counts_and_passes_bash_n(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, script, err = launch(capsys, "--nodes", "4", "--gpus-per-node", "8", "--slurm",
                               "--time", "2:00:00", "--partition", "gpu", "--grace", "240",
                               "--out_dir", str(out_dir), "--system.distributed.dp_shard", "32",
                               "--training.max_iters", "7")  # fmt: skip
    assert code == 0, err
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    lines = script.splitlines()
    for header in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=2:00:00",
                   "--partition=gpu", "--signal=B:TERM@240", "--requeue",
                   f"--output={out_dir}/slurm-%j.log"):  # fmt: skip
        assert f"#SBATCH {header}" in lines
    assert out_dir.is_dir()  # Slurm opens the log there before the script runs
    srun = next(line for line in lines if line.startswith("srun "))
    words = shlex.split(srun.replace('"$head_node:', '"HEAD:').replace('"$SLURM_JOB_ID"', "42"))
    assert words[words.index("--nnodes") + 1] == "4"
    assert words[words.index("--nproc_per_node") + 1] == "8"
    assert words[words.index("--rdzv_backend") + 1] == "c10d"
    assert words[words.index("--shutdown-timeout") + 1] == "240"
    train = words[words.index("train") + 1 :]
    assert train[0] == CONFIG
    flags = dict(zip(train[1::2], train[2::2]))
    assert flags["--system.distributed.dp_shard"] == "32" and flags["--training.max_iters"] == "7"
    assert flags["--system.distributed.enabled"] == "true"  # tiny.yaml has it off
    assert flags["--checkpointer.resume_from"] == "latest"  # a requeued job resumes


def test_torchrun_commands_one_per_node(capsys):
    code, out, _ = launch(capsys, "--nodes", "3", "--gpus-per-node", "2",
                          "--system.distributed.expert_parallel", "2")  # fmt: skip
    assert code == 0
    commands = [line for line in out.splitlines() if not line.startswith("#")]
    assert len(commands) == 3
    for node, command in enumerate(commands):
        head = '"${HEAD_NODE:?set HEAD_NODE to the address of node 0}"'  # bash says so when unset
        assert head in command
        words = shlex.split(command.replace(head, "HEAD"))
        assert words[words.index("--node_rank") + 1] == str(node)
        assert words[words.index("--nnodes") + 1] == "3"
        assert words[words.index("--master_addr") + 1] == "HEAD"


def test_a_layout_that_does_not_fit_is_exit_2_naming_the_fields(capsys):
    code, out, err = launch(capsys, "--nodes", "2", "--gpus-per-node", "3",
                            "--system.distributed.dp_shard", "4")  # fmt: skip
    assert code == 2 and not out
    assert "2 nodes x 3 processes" in err and "system.distributed.dp_shard (4)" in err
    code, _, err = launch(
        capsys, "--nodes", "1", "--gpus-per-node", "1", "--training.max_iters", "x"
    )
    assert code == 2 and "training.max_iters" in err  # the config is validated as train would


def stand_ins(folder, srun_body):
    """srun and scontrol stand-ins: scontrol answers `show hostnames` and records `requeue`."""
    folder.mkdir()
    (folder / "scontrol").write_text(
        "#!/bin/bash\n"
        'if [ "$1" = show ]; then echo node-a; echo node-b; else echo "$@" >> "$LOG"; fi\n'
    )
    (folder / "srun").write_text("#!/bin/bash\n" + srun_body)
    for name in ("scontrol", "srun"):
        os.chmod(folder / name, 0o755)


def run_script(capsys, tmp_path, srun_body, signal_after=None):
    _, script, _ = launch(capsys, "--nodes", "2", "--gpus-per-node", "1", "--slurm",
                          "--out_dir", str(tmp_path / "run"))  # fmt: skip
    (tmp_path / "job.sbatch").write_text(script)
    stand_ins(tmp_path / "bin", srun_body)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_ID="42",
               SLURM_JOB_NODELIST="node-[a-b]", LOG=str(tmp_path / "calls"))  # fmt: skip
    proc = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    if signal_after is not None:
        time.sleep(signal_after)
        proc.send_signal(signal.SIGTERM)  # Slurm's --signal=B:TERM, or a preemption
    out, err = proc.communicate(timeout=30)
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    return proc.returncode, out, calls


def test_the_slurm_script_requeues_after_a_stop_request_whatever_torchrun_exits(capsys, tmp_path):
    # torchrun, signalled, exits 1 after its workers saved: the script still requeues and exits 0
    srun = (
        "sleep 20 > /dev/null 2>&1 &\npid=$!\n"
        'trap \'kill $pid; echo "$@" > "$LOG.srun"; exit 1\' TERM\nwait\n'
    )
    code, out, calls = run_script(capsys, tmp_path, srun, signal_after=1.0)
    assert code == 0 and "requeue 42" in calls and "stop requested" in out
    assert "--rdzv_endpoint node-a:29500" in (tmp_path / "calls.srun").read_text()


def test_the_slurm_script_passes_a_failure_through_without_requeueing(capsys, tmp_path):
    code, _, calls = run_script(capsys, tmp_path, "exit 3\n")
    assert code == 3 and "requeue" not in calls


# --- two nodes on loopback ---------------------------------------------------------------------------

STEPS = ("--training.max_iters", "4", "--training.gradient_accumulation_steps", "2",
         "--evaluator.eval_interval", "2", "--checkpointer.save_interval", "0",
         "--sample.max_new_tokens", "0", "--system.distributed.backend", "gloo")  # fmt: skip


def node_commands(capsys, out, data_dir, *extra):
    """launch's torchrun command per node, 2 nodes x 1 process, on loopback; the config is the
    spec's defaults plus the flags, as in-process runs (run_trainer) take it."""
    base = out.parent / "defaults.yaml"
    base.write_text("# the spec defaults: the flags say the rest\n{}\n")
    code = launch_main([str(base), "--nodes", "2", "--gpus-per-node", "1", "--port",
                        str(free_port()), *trainer_args(out, data_dir, *STEPS, *extra)])  # fmt: skip
    text, err = capsys.readouterr()
    assert code == 0, err
    commands = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(commands) == 2
    return commands


def start_nodes(commands):
    env = dict(ENV, HEAD_NODE="127.0.0.1", PATH=f"{os.path.dirname(sys.executable)}:{ENV['PATH']}")
    return [subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            for command in commands]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("one")
    run_trainer(out, data_dir, *STEPS)
    return out


@pytest.mark.multiprocess
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("layout", ["ddp", "fsdp2"])
def test_two_nodes_on_loopback_give_one_process_losses(
    layout, capsys, tmp_path, data_dir, one_process
):
    extra = ("--system.distributed.dp_shard", "2") if layout == "fsdp2" else ()
    nodes = start_nodes(node_commands(capsys, tmp_path / "run", data_dir, *extra))
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, results):
        assert node.returncode == 0, err[-3000:]
    for key in ("loss", "val_loss"):
        assert losses(tmp_path / "run", key) == pytest.approx(
            losses(one_process, key), rel=1e-4, abs=1e-6
        )


@pytest.mark.multiprocess
@pytest.mark.usefixtures("one_thread")
def test_a_killed_node_ends_the_other_within_the_timeout(capsys, tmp_path, data_dir):
    timeout = 8
    commands = node_commands(capsys, tmp_path / "run", data_dir, "--training.max_iters", "500",
                             "--system.distributed.timeout", str(timeout))  # fmt: skip
    head, other = start_nodes(commands)
    start = time.monotonic()
    while not any(r.get("iter", 0) >= 2 for r in _rows(tmp_path / "run")):
        assert head.poll() is None and time.monotonic() - start < 120, head.communicate()
        time.sleep(0.2)
    for pid in [other.pid, *descendants(other.pid)]:  # the whole node: torchrun and its worker
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    _, err = head.communicate(timeout=timeout + 60)
    assert time.monotonic() - killed < timeout + 30
    assert head.returncode != 0
    errors = [line for line in err.splitlines() if "train: error:" in line]
    assert errors and "rank 0" in errors[0] and "collective" in errors[0], err[-3000:]
    assert f'File "{REPO / "runtime"}' not in err  # a message, not our traceback


def descendants(pid):
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _rows(out):
    try:
        return metrics(out)
    except (OSError, ValueError):
        return []
