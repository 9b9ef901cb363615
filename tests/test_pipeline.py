"""Pipeline parallelism under torchrun with gloo on CPU: every schedule on 2 stages reproduces one
process's losses (gradient accumulation and MTP on), also as 2 data-parallel pipelines,
resharding resumes between pipelined and unpipelined layouts and an exact one on the same layout,
and a non-finite loss that every stage sees alike."""

import os
import subprocess

import pytest

from helpers import ENV, PYTHON, REPO, free_port, losses, metrics, run_trainer, trainer_args

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 6
# 4 layers (one dense), so that 2 processes x 2 stages each have a layer; 4 micro-batches a step
COMMON = (
    "--model.n_layers", "4",
    "--training.max_iters", str(STEPS),
    "--training.gradient_accumulation_steps", "4",
    "--evaluator.eval_iters", "2",
    "--evaluator.eval_interval", "3",
    "--checkpointer.save_interval", "0",
    "--schedule.lr_decay_iters", str(STEPS),
    "--sample.temperature", "0",
)  # fmt: skip
DIST = ("--system.distributed.enabled", "true", "--system.distributed.backend", "gloo")


def torchrun(n, out, data_dir, *extra, check=True):
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "runtime", "train", *trainer_args(out, data_dir, *COMMON, *DIST, *extra),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def pipeline(schedule, stages=2):
    return (
        "--system.distributed.pipeline_parallel", str(stages),
        "--system.distributed.pipeline_schedule", schedule,
    )  # fmt: skip


def assert_same_losses(got, want, keys=("loss", "main_loss", "mtp_loss_1", "val_loss")):
    for key in keys:
        a, b = losses(got, key), losses(want, key)
        assert len(a) == len(b) > 0, key
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key
    # the gradient norm is the touchiest: the embedding's two copies sum their gradients in
    # another order than one process's single graph, and AdamW amplifies that into ~1e-4 by step 5
    assert losses(got, "grad_norm") == pytest.approx(losses(want, "grad_norm"), rel=1e-3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The single-process run every pipeline must reproduce (a checkpoint at step 3)."""
    out = tmp_path_factory.mktemp("ref")
    run_trainer(out, data_dir, *COMMON, "--checkpointer.save_interval", "3")
    return out


@pytest.fixture(scope="module")
def zbv_run(tmp_path_factory, data_dir):
    """A zero-bubble V pipeline on 2 processes, checkpointing at step 3 (DCP)."""
    out = tmp_path_factory.mktemp("zbv")
    torchrun(2, out, data_dir, *pipeline("zbv"), "--checkpointer.save_interval", "3")
    return out


# on 4 processes, 2 stages x 2: gpipe as two pipelines reading half of every step's micro-batches
# each (data-parallel replicas), 1f1b with FSDP2 over the two processes of a stage, interleaved
# 1f1b with expert parallelism over them; the V schedules on 2 processes (dualpipev recomputing
# every block: activation checkpointing must not change a loss)
SCHEDULES = {
    "gpipe": (4, ()),
    "1f1b": (4, ("--system.distributed.dp_shard", "2")),
    "interleaved_1f1b": (4, ("--system.distributed.expert_parallel", "2")),
    "zbv": (2, ()),
    "dualpipev": (2, ("--system.distributed.activation_checkpointing", "full")),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_reproduces_one_process(schedule, tmp_path, data_dir, reference, request):
    processes, layout = SCHEDULES[schedule]
    if schedule == "zbv":
        out = request.getfixturevalue("zbv_run")
    else:
        out = tmp_path
        torchrun(processes, out, data_dir, *pipeline(schedule), *layout)
    assert_same_losses(out, reference)
    # the balance statistics and the MTP weight come out as in one process too
    for key in ("aux_loss", "z_loss", "mtp_weight"):
        assert losses(out, key) == pytest.approx(losses(reference, key), rel=1e-4), key
    # so do the routing statistics of every MoE layer, which different stages hold, where one
    # pipeline sees the whole batch (with data-parallel pipelines they are process 0's tokens,
    # as on every data-parallel layout)
    if processes == 2:
        for layer in (1, 2, 3, 4):  # layers 1-3 and the MTP block
            key = f"moe/layer{layer}/tokens_per_expert"
            assert losses(out, key) == losses(reference, key), key
        for key in ("moe/max_load_ratio", "moe/cv"):
            assert losses(out, key) == pytest.approx(losses(reference, key), rel=1e-6), key
    assert (out / "sample.txt").read_text() == (reference / "sample.txt").read_text()  # greedy


def test_resharding_resumes_between_pipelined_and_single_process_runs(
    tmp_path, data_dir, reference, zbv_run
):
    # a pipelined run's DCP checkpoint resumes in one process, with the uninterrupted losses
    saved = zbv_run / "checkpoints" / "ckpt_0000003"
    assert saved.is_dir()  # a DCP folder
    run_trainer(tmp_path / "one", data_dir, *COMMON, "--checkpointer.resume_from", str(saved))
    want = losses(reference, "loss")[3:]
    assert losses(tmp_path / "one", "loss") == pytest.approx(want, rel=1e-4)
    # one process's checkpoint resumes as a pipeline with expert parallel stages
    single = reference / "checkpoints" / "ckpt_0000003.pt"
    torchrun(4, tmp_path / "back", data_dir, *pipeline("1f1b"), "--checkpointer.resume_from",
             str(single), "--system.distributed.expert_parallel", "2")  # fmt: skip
    assert losses(tmp_path / "back", "loss") == pytest.approx(want, rel=1e-4)
    # and on its own layout a pipelined run resumes bit for bit
    again = tmp_path / "again"
    torchrun(2, again, data_dir, *pipeline("zbv"), "--checkpointer.resume_from", str(saved))
    assert losses(again, "loss") == losses(zbv_run, "loss")[3:]
    assert losses(again, "val_loss") == losses(zbv_run, "val_loss")[1:]


def test_a_non_finite_loss_stops_every_stage_together(tmp_path, data_dir):
    """NaN only in the head, which only the last stage holds: every process sees the step's
    loss and stops at the same step, with one message."""
    import torch

    from runtime.checkpoint.single_file import atomic_save, load_checkpoint

    run_trainer(tmp_path / "one", data_dir, *COMMON, "--training.max_iters", "1",
                "--checkpointer.save_interval", "1")  # fmt: skip
    state = load_checkpoint(str(tmp_path / "one" / "checkpoints" / "ckpt_0000001.pt"))
    state["model"]["head.weight"][0, 0] = float("nan")
    atomic_save(state, str(tmp_path / "nan.pt"))
    proc = torchrun(2, tmp_path / "o", data_dir, *pipeline("1f1b"), "--checkpointer.init_from",
                    str(tmp_path / "nan.pt"), check=False)  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "non-finite loss (nan) at step 1" in errors[0], proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl") or not [
        r for r in metrics(tmp_path / "o") if "loss" in r
    ]
    assert torch.isnan(state["model"]["head.weight"]).any()
