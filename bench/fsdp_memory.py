"""Per-process bytes of weights + gradients + AdamW state: DDP vs FSDP2 on 2 gloo processes.

Counted from the live tensors (runtime/distributed/data_parallel.py: state_bytes) right before the first
`optimizer.zero_grad`, i.e. with gradients and optimizer state both allocated; a DTensor counts its
local shard. `python -m bench.fsdp_memory` prints both and their ratio (also part of `make bench`).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a model big enough that FSDP2's per-parameter padding is negligible, small enough for seconds
FLAGS = [
    "--model.dim", "64", "--model.inter_dim", "128", "--model.moe_inter_dim", "32",
    "--model.n_layers", "2", "--model.n_heads", "2", "--model.kv_lora_rank", "16",
    "--model.qk_nope_head_dim", "16", "--model.qk_rope_head_dim", "8", "--model.v_head_dim", "16",
    "--model.n_routed_experts", "4", "--model.max_seq_len", "32", "--training.seq_len", "16",
    "--training.batch_size", "2", "--training.gradient_accumulation_steps", "2",
    "--training.max_iters", "1", "--evaluator.eval_iters", "2", "--checkpointer.save_interval", "0",
    "--checkpointer.save_best", "false", "--sample.max_new_tokens", "0",
    "--system.distributed.enabled", "true", "--system.distributed.backend", "gloo",
]  # fmt: skip


def worker(argv):
    """One process of the measured run (under torchrun): train one step, report the bytes."""
    from generated.parser import load_config
    from runtime.distributed.data_parallel import state_bytes
    from runtime.trainer.trainer import Trainer

    trainer = Trainer(load_config(argv=argv))
    seen = []
    zero_grad = trainer.optimizer.zero_grad

    def measured(*a, **k):
        seen.append(state_bytes(trainer.model, trainer.optimizer))
        zero_grad(*a, **k)

    trainer.optimizer.zero_grad = measured
    trainer.run()
    if trainer.is_main:
        print("STATE_BYTES", json.dumps(max(seen)), flush=True)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out_dir, data_dir, *extra):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "bench.fsdp_memory", "worker",
        *FLAGS, "--out_dir", str(out_dir), "--data.data_dir", str(data_dir), *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    line = [x for x in proc.stdout.splitlines() if x.startswith("STATE_BYTES")][-1]
    return int(json.loads(line.split(" ", 1)[1]))


def measure(work_dir, data_dir):
    """(DDP bytes, FSDP2 bytes) per process on 2 processes."""
    ddp = _run(os.path.join(work_dir, "ddp"), data_dir)
    fsdp = _run(os.path.join(work_dir, "fsdp"), data_dir, "--system.distributed.dp_shard", "2")
    return ddp, fsdp


def run(quick=False):
    """The `make bench` suite: one figure, FSDP2 / DDP bytes per process, target <= 0.55."""
    from .common import Target

    with tempfile.TemporaryDirectory() as tmp:
        ddp, fsdp = measure(tmp, os.path.join(REPO, "data"))
    figures = {
        "ddp_state_bytes_per_process": ddp,
        "fsdp2_state_bytes_per_process": fsdp,
        "fsdp2_over_ddp": fsdp / ddp,
    }
    target = Target(
        "fsdp2_state_bytes_vs_ddp_2proc",
        fsdp / ddp,
        0.55,
        higher_is_better=False,
        detail=f"weights+grads+AdamW per process: {fsdp:,} B FSDP2 vs {ddp:,} B DDP (2 gloo processes)",
    )
    return {"figures": figures, "targets": [target]}


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2:])
    else:
        print(json.dumps(run()["figures"], indent=2))
