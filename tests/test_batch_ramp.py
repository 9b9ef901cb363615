"""The batch-size ramp in the data and the trainer: which sample ids each step and process reads
(sampling.py's BatchPlan), the metrics rows that count its tokens, resuming mid-ramp, and the
launch-time check that every stage splits over the processes."""

import subprocess

import pytest

from generated.parser import load_config
from helpers import ENV, PYTHON, REPO, free_port, losses, metrics, run_trainer, trainer_args
from runtime.components.data.errors import DataError
from runtime.components.data.sampling import BatchPlan
from runtime.configlib.quantities import BatchRamp
from runtime.trainer.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 16
# batch_size 2, full batch 2 * 4 = 8 sequences; 2 -> 8 by 2 over 384 tokens (128 per stage):
# steps 1-4 read 2 sequences, 5-6 four, 7-8 six, then eight
RAMP = (
    "--training.gradient_accumulation_steps", "4", "--training.batch_size_start", "2",
    "--training.batch_size_rampup", "384",
)  # fmt: skip
BATCHES = [2, 2, 2, 2, 4, 4, 6, 6, 8]


def ids(plan, step):
    return [i for micro in plan.micro_batches(step) for i in micro]


def test_without_a_ramp_the_ids_are_the_fixed_formula():
    batch_size, accum = 3, 4
    for world in (1, 2, 4):
        for rank in range(world):
            plan = BatchPlan(
                BatchRamp(seq_len=SEQ, full=batch_size * accum),
                batch_size=batch_size,
                world_size=world,
                rank=rank,
            )
            per_rank = accum // world
            for step in range(5):
                assert plan.micro_batches(step) == [
                    [
                        (step * accum + rank * per_rank + m) * batch_size + b
                        for b in range(batch_size)
                    ]
                    for m in range(per_rank)
                ]


def test_along_a_ramp_the_ids_are_contiguous_and_ranks_partition_them():
    ramp = BatchRamp(seq_len=SEQ, full=8, start=2, increment=2, rampup=384)
    one = BatchPlan(ramp, batch_size=2)
    assert [one.global_batch(s) for s in range(len(BATCHES))] == BATCHES
    seen = []
    for step in range(12):
        step_ids = ids(one, step)
        assert step_ids == list(range(len(seen), len(seen) + ramp.batch(step)))
        assert len(one.micro_batches(step)) == one.micro_per_rank(step) == ramp.batch(step) // 2
        seen += step_ids
        assert one.samples_trained(step + 1) == len(seen) == ramp.samples_before(step + 1)
    # two processes: each takes its contiguous half of the micro-batches, together the one
    # process's step (a ramp of whole micro-batches per process: 4 -> 8 by 4)
    ramp4 = BatchRamp(seq_len=SEQ, full=8, start=4, increment=4, rampup=384)
    single = BatchPlan(ramp4, batch_size=2)
    two = [BatchPlan(ramp4, batch_size=2, world_size=2, rank=r) for r in (0, 1)]
    for step in range(8):
        halves = [p.micro_batches(step) for p in two]
        assert len(halves[0]) == len(halves[1]) == ramp4.batch(step) // 4
        assert halves[0] + halves[1] == single.micro_batches(step)


def test_a_stage_that_does_not_split_over_the_processes_is_a_launch_error(
    tmp_path, data_dir, monkeypatch
):
    with pytest.raises(DataError, match="batch_size_start"):
        BatchPlan(BatchRamp(seq_len=SEQ, full=8, start=2, increment=2, rampup=384),
                  batch_size=2, world_size=2)  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = trainer_args(tmp_path / "o", data_dir, *RAMP, "--system.distributed.enabled", "true")
    with pytest.raises(DataError) as error:  # before any process group or model
        Trainer(load_config(argv=argv))
    message = str(error.value)
    assert "\n" not in message
    for name in ("training.batch_size_start", "training.batch_size_increment",
                 "training.gradient_accumulation_steps", "2 processes"):  # fmt: skip
        assert name in message, message


def test_a_ramped_run_logs_its_batches_and_tokens_and_resumes_exactly(tmp_path, data_dir):
    common = (*RAMP, "--evaluator.eval_interval", "4", "--checkpointer.save_interval", "4")
    run_trainer(tmp_path / "full", data_dir, *common, "--training.max_iters", "9")
    rows = [r for r in metrics(tmp_path / "full") if "loss" in r]
    assert [r["batch_size"] for r in rows] == BATCHES
    tokens = [sum(BATCHES[: i + 1]) * SEQ for i in range(len(BATCHES))]
    assert [r["tokens"] for r in rows] == tokens
    assert all("skipped_batches" not in r for r in rows)
    log = (tmp_path / "full" / "train.log").read_text()
    assert "batch ramp 2 -> 8 over 384 tokens" in log
    # stopped in the middle of the ramp (after step 4: the next step reads 4 sequences), resumed
    part = tmp_path / "part"
    run_trainer(part, data_dir, *common, "--training.max_iters", "4")
    run_trainer(part, data_dir, *common, "--training.max_iters", "9",
                "--checkpointer.resume_from", "latest")  # fmt: skip
    for key in ("loss", "grad_norm", "tokens", "batch_size", "val_loss"):
        assert losses(part, key) == losses(tmp_path / "full", key), key


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_ramped_run_on_two_processes_matches_one(tmp_path, data_dir):
    common = (
        "--training.gradient_accumulation_steps", "4", "--training.batch_size_start", "4",
        "--training.batch_size_increment", "4",
        "--training.batch_size_rampup", "128", "--training.max_iters", "4",
        "--evaluator.eval_interval", "4", "--checkpointer.save_interval", "0",
    )  # fmt: skip
    run_trainer(tmp_path / "one", data_dir, *common)
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
        "127.0.0.1", "--master_port", str(free_port()), "-m", "runtime", "train",
        *trainer_args(tmp_path / "two", data_dir, *common, "--system.distributed.enabled", "true",
                      "--system.distributed.backend", "gloo"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert losses(tmp_path / "one", "batch_size") == [4, 4, 8, 8]
    assert losses(tmp_path / "two", "batch_size") == losses(tmp_path / "one", "batch_size")
    assert losses(tmp_path / "two", "tokens") == losses(tmp_path / "one", "tokens")
    for key in ("loss", "grad_norm", "val_loss"):
        assert losses(tmp_path / "two", key) == pytest.approx(
            losses(tmp_path / "one", key), rel=1e-4, abs=1e-6
        ), key
