"""`deepseek-moe launch CONFIG --nodes N --gpus-per-node G [--slurm] [--section.field VALUE ...]`:
the commands that start `train CONFIG` on N nodes of G processes each. It prints; it runs nothing.

The config and flags are validated first (a config error exits 2, as `train` would) and the layout
of `system.distributed` is checked against N x G processes with the arithmetic `plan` uses. Without
`--slurm` it prints one torchrun command per node (static rendezvous on the first node, whose
address the HEAD_NODE variable gives). With `--slurm` it prints an sbatch script: one task per
node, each running torchrun, a c10d rendezvous on the job's first node, and preemption handled as
README "Fault tolerance" describes: SIGTERM finishes the step, saves and requeues the job, which
resumes from the latest checkpoint. It creates `out_dir` (Slurm opens the job's log there before
the script runs). No torch needed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from generated import PATH
from generated.config import Config
from generated.names import ResumeFrom
from generated.parser import resolve
from runtime.cli import console
from runtime.distributed.layout import layout_for

PROG = "launch"
DEFAULT_PORT = 29500
DEFAULT_GRACE = 180  # seconds between Slurm's SIGTERM and its SIGKILL, for the step and the save


class LaunchError(ValueError):
    """The launch does not fit the config (exit 2: the input is wrong)."""


def _torchrun() -> str:
    """The torchrun of this environment, relative to the working directory when inside it."""
    here = Path(sys.executable).parent / "torchrun"
    if not here.exists():
        return "torchrun"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


def train_flags(cfg: Config, overrides: list[str], world: int, slurm: bool) -> list[str]:
    """The user's flags plus what a multi-process (and, for Slurm, requeued) run needs."""
    flags = list(overrides)
    if world > 1 and not cfg.system.distributed.enabled:
        flags += [f"--{PATH.system.distributed.enabled}", "true"]
    if slurm and cfg.checkpointer.resume_from != ResumeFrom.LATEST:
        flags += [f"--{PATH.checkpointer.resume_from}", ResumeFrom.LATEST.value]  # requeued: resume
    return flags


def check_layout(cfg: Config, nodes: int, gpus: int) -> None:
    if nodes < 1 or gpus < 1:
        raise LaunchError(f"--nodes ({nodes}) and --gpus-per-node ({gpus}) must be at least 1")
    _, problem = layout_for(cfg.system.distributed, nodes * gpus)
    if problem is not None:
        raise LaunchError(f"{nodes} nodes x {gpus} processes: {problem}")


def torchrun_commands(args: argparse.Namespace, flags: list[str]) -> str:
    """One torchrun command per node, static rendezvous on $HEAD_NODE (127.0.0.1 for one node)."""
    head = (
        "127.0.0.1" if args.nodes == 1 else '"${HEAD_NODE:?set HEAD_NODE to the address of node 0}"'
    )
    train = shlex.join(["-m", "runtime", "train", args.config, *flags])
    lines = []
    for node in range(args.nodes):
        if args.nodes > 1:
            lines.append(
                f"# on node {node} of {args.nodes}" + (" (HEAD_NODE)" if node == 0 else "")
            )
        lines.append(
            f"{_torchrun()} --nnodes {args.nodes} --nproc_per_node {args.gpus_per_node} "
            f"--node_rank {node} --master_addr {head} --master_port {args.port} "
            f"--shutdown-timeout {args.grace} {train}"
        )
    return "\n".join(lines) + "\n"


def slurm_script(args: argparse.Namespace, cfg: Config, flags: list[str]) -> str:
    out_dir = os.path.abspath(cfg.out_dir)
    optional = [
        f"#SBATCH --{name}={value}"
        for name, value in (
            ("partition", args.partition),
            ("account", args.account),
            ("time", args.time),
            ("cpus-per-task", args.cpus_per_node),
        )
        if value
    ]
    train = shlex.join(["-m", "runtime", "train", args.config, *flags])
    # the workers get SIGTERM from Slurm too and need the step and the save done before SIGKILL;
    # torchrun waits that long for them (its default, 30 s, would kill a large model's save)
    torchrun = (
        f"{_torchrun()} --nnodes {args.nodes} --nproc_per_node {args.gpus_per_node} "
        f'--rdzv_backend c10d --rdzv_endpoint "$head_node:{args.port}" --rdzv_id "$SLURM_JOB_ID" '
        f"--shutdown-timeout {args.grace} {train}"
    )
    lines = [
        "#!/bin/bash",
        f"# written by `deepseek-moe launch --slurm` for {args.config}; submit with: sbatch FILE",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        *optional,
        f"#SBATCH --output={out_dir}/slurm-%j.log",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal=B:TERM@{args.grace}",
        "#SBATCH --requeue",
        "",
        "set -u",
        f"cd {shlex.quote(os.getcwd())}",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "",
        "# Preemption or the time limit: Slurm sends SIGTERM. The trainer finishes its step, saves a",
        "# checkpoint and exits 0; torchrun itself, signalled too, exits 1 (SignalException) whatever",
        "# its workers did, so the stop request, not the exit code, decides: requeue, and the new",
        "# allocation resumes from the latest checkpoint.",
        "stop_requested=0",
        'on_stop() { stop_requested=1; kill -TERM "$srun_pid" 2>/dev/null; }',
        "trap on_stop TERM INT",
        "",
        f"srun --kill-on-bad-exit=1 {torchrun} &",
        "srun_pid=$!",
        'while wait "$srun_pid"; status=$?; kill -0 "$srun_pid" 2>/dev/null; do :; done',
        'if [ "$stop_requested" = 1 ]; then',
        '    echo "stop requested: requeueing job $SLURM_JOB_ID (it resumes from the latest checkpoint)"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deepseek-moe launch",
        description="Print the torchrun commands (or, with --slurm, an sbatch script) that train "
        "CONFIG on NODES x GPUS_PER_NODE processes. Config flags pass through to train.",
    )
    parser.add_argument("config", help="config file")
    parser.add_argument("--nodes", type=int, required=True, help="nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="processes per node")
    parser.add_argument("--slurm", action="store_true", help="print an sbatch script")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="rendezvous port")
    parser.add_argument(
        "--grace",
        type=int,
        default=DEFAULT_GRACE,
        help=f"seconds for the last step and the save after a stop signal (default {DEFAULT_GRACE})",
    )
    parser.add_argument("--job-name", default="deepseek-moe", help="Slurm job name")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--time", help="Slurm time limit (e.g. 24:00:00)")
    parser.add_argument("--cpus-per-node", type=int, help="Slurm CPUs for each node's task")
    known, overrides = parser.parse_known_args(argv)
    return console.run_command(PROG, lambda: _launch(known, overrides))


def _launch(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = resolve(args.config, argv=overrides).config
    try:
        check_layout(cfg, args.nodes, args.gpus_per_node)
    except LaunchError as error:
        console.error(PROG, error)
        return console.EXIT_USAGE
    if cfg.system.device.device == "cpu":
        console.warning(
            PROG,
            f"{PATH.system.device.device} is cpu: the processes will not use the GPUs "
            f"(--{PATH.system.device.device} cuda)",
        )
    flags = train_flags(cfg, overrides, args.nodes * args.gpus_per_node, args.slurm)
    if args.slurm:
        os.makedirs(cfg.out_dir, exist_ok=True)  # Slurm opens the log there before the job runs
        print(slurm_script(args, cfg, flags), end="")
    else:
        print(torchrun_commands(args, flags), end="")
    return console.EXIT_OK
