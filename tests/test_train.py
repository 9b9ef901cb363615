"""The trainer end to end: CLI, outputs, seeding, accumulation, DDP, precision, compile, wandb,
non-finite losses, and every example config."""

import datetime
import glob
import json
import os
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch

from generated.parser import load_config
from helpers import ENV, PYTHON, REPO, free_port, losses, metrics, run_trainer, trainer_args
from runtime.cli.train import main
from runtime.components.data.errors import DataError
from runtime.distributed import precision
from runtime.distributed.layout import SystemConfigError
from runtime.trainer.trainer import NonFiniteLossError, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_run_writes_every_output(tmp_path, data_dir):
    out = tmp_path / "out"
    cmd = [
        PYTHON,
        "-m",
        "runtime",
        "train",
        os.path.join(REPO, "configs", "tiny.yaml"),
        *trainer_args(out, data_dir),
        "--training.max_iters",
        "4",
        "--evaluator.eval_interval",
        "2",
        "--training.log_interval",
        "2",
        "--checkpointer.save_interval",
        "2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "--- sample ---" in proc.stdout
    assert "val loss" in proc.stdout + proc.stderr
    # piped: no progress bar (no carriage returns), one timestamped line per log_interval steps
    assert "\r" not in proc.stdout + proc.stderr
    step_lines = [
        line for line in proc.stdout.splitlines() if re.search(r"step \d+/4 \| loss", line)
    ]
    assert len(step_lines) == 2
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step 4/4 \| loss \d+\.\d{4} \(main \d+\.\d{4}\) \| lr \S+ \| [\d,]+ tok/s \| eta 0:00",
        step_lines[-1],
    ), step_lines[-1]
    # train.log holds the same lines as the console (stdout and stderr), timestamps included
    log_lines = (out / "train.log").read_text().splitlines()
    console = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if re.match(r"\d{4}-\d\d-\d\d ", line)
    ]
    assert sorted(log_lines) == sorted(console) and step_lines[-1] in log_lines
    assert any("val loss" in line and "bits/byte" in line for line in log_lines)
    records = metrics(out)
    train_records = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train_records] == [2, 4]
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    for r in records:  # every row: the run, wall-clock time and elapsed seconds
        assert r["run_id"] == run_id and isinstance(r["elapsed_s"], float)
        assert datetime.datetime.fromisoformat(r["time"]).tzinfo is not None
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    for r in train_records:
        for key in (
            "loss",
            "lr",
            "tokens_per_s",
            "main_loss",
            "aux_loss",
            "z_loss",
            "mtp_loss_1",
            "mtp_weight",
            "phase",
            "moe/max_load_ratio",
            "moe/cv",
            "moe/dropped_frac",
        ):
            assert key in r, key
        assert any(k.endswith("tokens_per_expert") for k in r)
    assert [r["iter"] for r in records if "val_loss" in r] == [2, 4]
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "sample.txt").read_text().startswith("def ")
    assert sorted(os.listdir(out / "checkpoints")) == [
        "best.pt",
        "ckpt_0000002.pt",
        "ckpt_0000004.pt",
    ]
    assert load_config(out / "config.yaml").training.max_iters == 4


def test_config_errors_exit_2(tmp_path, capsys):
    assert main(["--model.top_k", "99", "--out_dir", str(tmp_path)]) == 2
    assert "top_k" in capsys.readouterr().err


def test_same_seed_same_losses(tmp_path, data_dir):
    extra = (
        "--training.max_iters",
        "3",
        "--moe.router_noise_scale",
        "0.1",
        "--evaluator.eval_interval",
        "3",
    )
    run_trainer(tmp_path / "a", data_dir, *extra)
    run_trainer(tmp_path / "b", data_dir, *extra)
    run_trainer(tmp_path / "c", data_dir, *extra, "--seed", "7")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a", "val_loss") == losses(tmp_path / "b", "val_loss")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, data_dir):
    # accum 2 x batch 1 reads the same windows as accum 1 x batch 2
    run_trainer(
        tmp_path / "acc",
        data_dir,
        "--training.max_iters",
        "3",
        "--training.batch_size",
        "1",
        "--training.gradient_accumulation_steps",
        "2",
        "--evaluator.eval_interval",
        "3",
    )
    run_trainer(
        tmp_path / "big",
        data_dir,
        "--training.max_iters",
        "3",
        "--training.batch_size",
        "2",
        "--evaluator.eval_interval",
        "3",
    )
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), rel=1e-5)
    assert losses(tmp_path / "acc", "grad_norm") == pytest.approx(
        losses(tmp_path / "big", "grad_norm"), rel=1e-4
    )


def test_grad_clip_zero_disables_clipping(tmp_path, data_dir):
    run_trainer(tmp_path / "o", data_dir, "--training.max_iters", "1", "--optimizer.grad_clip", "0")
    assert "grad_norm" not in metrics(tmp_path / "o")[0]


def test_eval_only(tmp_path, data_dir, capsys):
    assert main(trainer_args(tmp_path / "o", data_dir, "--evaluator.eval_only", "true")) == 0
    records = metrics(tmp_path / "o")
    assert len(records) == 1 and records[0]["iter"] == 0 and records[0]["val_loss"] > 5
    assert not os.path.exists(tmp_path / "o" / "checkpoints")


def test_multi_phase_reports_phases(tmp_path, data_dir):
    run_trainer(
        tmp_path / "o",
        data_dir,
        "--training.max_iters",
        "3",
        "--schedule.schedule_type",
        "multi_phase",
        "--schedule.phase_steps",
        "[1, 2]",
        "--schedule.phase_names",
        "[mid, late]",
    )
    assert [r["phase"] for r in metrics(tmp_path / "o") if "phase" in r] == [
        "initial",
        "mid",
        "late",
    ]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_dtypes(tmp_path, data_dir, dtype):
    trainer = run_trainer(
        tmp_path / "o", data_dir, "--training.max_iters", "2", "--system.device.dtype", dtype
    )
    assert trainer.scaler.is_enabled() == (dtype == "float16")
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "o"))))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


@pytest.mark.parametrize("native", [True, False])
def test_low_precision_on_a_cpu_without_native_matmul_warns(
    tmp_path, data_dir, monkeypatch, native
):
    # an AVX2-only CPU emulates bf16 matmuls hundreds of times slower than fp32: say so, run anyway
    monkeypatch.setattr(precision, "cpu_native_matmul", lambda dtype: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_trainer(
            tmp_path / "o",
            data_dir,
            "--training.max_iters",
            "1",
            "--system.device.dtype",
            "bfloat16",
        )
    slow = [str(w.message) for w in caught if "no native" in str(w.message)]
    if native:
        assert slow == []
    else:
        assert len(slow) == 1 and slow[0].startswith("system.device.dtype is bfloat16 but this CPU")


def test_nonfinite_loss_stop_and_skip(tmp_path, data_dir):
    def poisoned(trainer):
        real = trainer.loss

        def loss(model, window, step):
            out = real(model, window, step)
            if step == 1:
                out.loss = out.loss * float("nan")
            return out

        trainer.loss = loss
        return trainer

    trainer = poisoned(
        Trainer(
            load_config(argv=trainer_args(tmp_path / "stop", data_dir, "--training.max_iters", "3"))
        )
    )
    with pytest.raises(NonFiniteLossError, match="step 2"):
        trainer.run()
    trainer = poisoned(
        Trainer(
            load_config(
                argv=trainer_args(
                    tmp_path / "skip",
                    data_dir,
                    "--training.max_iters",
                    "3",
                    "--training.nonfinite_loss",
                    "skip",
                )
            )
        )
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.run() == 0
    records = [r for r in metrics(tmp_path / "skip") if "loss" in r]
    assert [r.get("skipped", False) for r in records] == [False, True, False]
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_skipping_has_a_budget_of_steps_in_a_row(tmp_path, data_dir, capsys):
    # an lr of 1e6 makes every loss after the first update non-finite: skipping alone would
    # "succeed" on no training at all
    args = trainer_args(tmp_path / "o", data_dir, "--training.max_iters", "8", "--optimizer.lr", "1e6",
                        "--schedule.warmup_iters", "0", "--training.nonfinite_loss", "skip",
                        "--training.max_skipped_steps", "3")  # fmt: skip
    assert main(args) == 1
    skipped = [r.get("skipped", False) for r in metrics(tmp_path / "o") if "loss" in r]
    assert skipped[-3:] == [True] * 3 and not skipped[-4] and len(skipped) < 8
    err = capsys.readouterr().err
    assert "the 4th step in a row: more than training.max_skipped_steps (3) skipped" in err


def test_device_resolution():
    from generated.config import DeviceConfig
    from runtime.distributed.layout import SystemConfigError as Err
    from runtime.distributed.utils import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(DeviceConfig(device="auto")).type == expected
    assert resolve_device(DeviceConfig(device="cpu")).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(Err, match="CUDA is not available"):
            resolve_device(DeviceConfig(device="cuda"))


def test_launch_errors(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemConfigError, match="system.distributed.enabled"):
        Trainer(load_config(argv=trainer_args(tmp_path / "o", data_dir)))
    with pytest.raises(DataError, match="gradient_accumulation_steps"):
        Trainer(
            load_config(
                argv=trainer_args(
                    tmp_path / "o",
                    data_dir,
                    "--system.distributed.enabled",
                    "true",
                    "--training.gradient_accumulation_steps",
                    "3",
                )
            )
        )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_two_processes_match_one(tmp_path, data_dir):
    common = (
        "--training.max_iters",
        "3",
        "--training.gradient_accumulation_steps",
        "2",
        "--evaluator.eval_interval",
        "3",
        "--checkpointer.save_interval",
        "0",
    )
    run_trainer(tmp_path / "one", data_dir, *common)
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "runtime",
        "train",
        *trainer_args(
            tmp_path / "two",
            data_dir,
            *common,
            "--system.distributed.enabled",
            "true",
            "--system.distributed.backend",
            "gloo",
        ),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for key in ("loss", "main_loss", "mtp_loss_1", "grad_norm", "val_loss"):
        assert losses(tmp_path / "two", key) == pytest.approx(
            losses(tmp_path / "one", key), rel=1e-4, abs=1e-6
        ), key
    # one set of outputs, written by rank 0
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["best.pt", "ckpt_0000003.pt"]
    a = torch.load(tmp_path / "one" / "checkpoints" / "ckpt_0000003.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "checkpoints" / "ckpt_0000003.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_wandb_offline(tmp_path, data_dir, monkeypatch):
    for var, sub in (
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "wdata"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    out = tmp_path / "o"
    run_trainer(
        out,
        data_dir,
        "--training.max_iters",
        "2",
        "--wandb.enabled",
        "true",
        "--wandb.project",
        "proj-x",
        "--wandb.run_name",
        "run-y",
        "--wandb.tags",
        "[t1, t2]",
        "--wandb.log_model",
        "true",
        "--evaluator.eval_interval",
        "2",
    )
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    logs = glob.glob(os.path.join(runs[0], "*.wandb"))
    assert len(logs) == 1
    needles = (
        b"proj-x",
        b"run-y",
        b"t1",
        b"max_iters",
        b"main_loss",
        b"val_loss",
        b"mtp_loss_1",
        b"ckpt_0000002.pt",
    )
    deadline = time.time() + 60  # wandb-core may still be writing the run file after finish()
    while True:
        with open(logs[0], "rb") as f:
            blob = f.read()
        missing = [n for n in needles if n not in blob]
        if not missing or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not missing


def test_wandb_missing_is_a_clear_error_before_training(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert main(trainer_args(tmp_path / "o", data_dir, "--wandb.enabled", "true")) == 1
    assert "wandb" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl")


def test_val_loss_falls(tmp_path, data_dir):
    run_trainer(
        tmp_path / "o",
        data_dir,
        "--training.max_iters",
        "150",
        "--training.batch_size",
        "8",
        "--optimizer.lr",
        "5e-3",
        "--schedule.warmup_iters",
        "5",
        "--schedule.lr_decay_iters",
        "150",
        "--evaluator.eval_interval",
        "150",
        "--evaluator.eval_iters",
        "4",
        "--training.log_interval",
        "50",
        "--checkpointer.save_interval",
        "0",
    )
    assert losses(tmp_path / "o", "val_loss")[-1] < 3.0  # ln 256 = 5.55


# ---------------------------------------------------------------------------------------------
# every example config, shrunk


def shrink_flags(path, out_dir, data_dir):
    cfg = load_config(path)
    flags = trainer_args(
        out_dir,
        data_dir,
        "--model.vocab_size",
        "256",
        "--model.first_k_dense",
        "1",
        "--model.n_group",
        "1",
        "--model.topk_group",
        "1",
        "--model.top_k",
        "2",
        "--data.dataset",
        "stdlib",
        "--data.sources",  # the stdlib corpus instead of a config's own prepared sources
        "[]",
        "--data.document_mask",
        "false",
        "--checkpointer.init_from",
        "scratch",
        "--system.device.device",
        "cpu",
        "--training.max_iters",
        "2",
        "--evaluator.eval_interval",
        "2",
        "--evaluator.eval_iters",
        "1",
        "--checkpointer.save_interval",
        "2",
        "--checkpointer.save_dir",
        str(out_dir / "ck"),
        "--wandb.enabled",
        "false",
        "--training.gradient_accumulation_steps",
        str(min(cfg.training.gradient_accumulation_steps, 2)),
        "--mtp.warmup_steps",
        "0",
    )
    if cfg.training.batch_size_start is not None:  # a ramp of one step: 1 micro-batch, then 2
        shrunk = load_config(path, argv=flags + ["--training.batch_size_start", "null"])
        micro = str(shrunk.training.batch_size)
        flags += ["--training.batch_size_start", micro, "--training.batch_size_increment", micro]
        flags += ["--training.batch_size_rampup", "1 tokens"]
    if cfg.model.q_lora_rank:
        flags += ["--model.q_lora_rank", "16"]
    if os.path.basename(path) != COMPILED_CONFIG:  # compiling takes long on CPU: one config does it
        flags += ["--system.compile.compile", "false"]
    return flags


CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
COMPILED_CONFIG = "tiny_compiled.yaml"  # runs with torch.compile (a few steps, tiny)


def test_there_are_example_configs():
    names = [os.path.basename(p) for p in CONFIGS]
    assert "tiny.yaml" in names and COMPILED_CONFIG in names
    assert load_config(os.path.join(REPO, "configs", COMPILED_CONFIG)).system.compile.compile


@pytest.mark.parametrize(
    "path",
    [  # compiling takes long on CPU
        pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) == COMPILED_CONFIG else p
        for p in CONFIGS
    ],
    ids=os.path.basename,
)
def test_example_config_runs(path, tmp_path, data_dir):
    trainer = Trainer(load_config(path, argv=shrink_flags(path, tmp_path, data_dir)))
    assert trainer.run() == 0
    compiled = isinstance(trainer.train_module, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled == (os.path.basename(path) == COMPILED_CONFIG)
    assert len(losses(tmp_path, "loss")) == 2
    assert os.path.exists(tmp_path / "ck" / "ckpt_0000002.pt")


class FakeFloat16Scaler:
    """A GradScaler stand-in that finds inf gradients (skip=True): it skips the step and halves
    its scale, as torch.amp.GradScaler does."""

    def __init__(self, skip):
        self.skip, self.value = skip, 1024.0

    def is_enabled(self):
        return True

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        pass

    def get_scale(self):
        return self.value

    def step(self, optimizer):
        if not self.skip:
            optimizer.step()

    def update(self):
        self.value *= 0.5 if self.skip else 1.0


def test_bias_moves_only_on_applied_steps(tmp_path, data_dir):
    trainer = Trainer(
        load_config(
            argv=trainer_args(
                tmp_path / "o",
                data_dir,
                "--training.nonfinite_loss",
                "skip",
                "--moe.bias_update_speed",
                "0.01",
            )
        )
    )
    model = trainer.model
    layers = [m for _, m in model.moe_layers()]
    batch = [torch.randint(0, 256, (2, trainer.window), generator=torch.Generator().manual_seed(0))]

    def bias():
        return torch.stack([m.gate.e_score_correction_bias.clone() for m in layers])

    before = bias()
    assert "skipped" not in trainer.train_step(0, batch)
    assert not torch.equal(bias(), before)  # an applied step moves it
    real = trainer.loss

    def nan_loss(model, window, step):
        out = real(model, window, step)
        out.loss = out.loss * float("nan")
        return out

    trainer.loss = nan_loss
    before = bias()
    assert trainer.train_step(1, batch)["skipped"]
    assert torch.equal(bias(), before)
    assert all(m.load_counts is None for m in layers)  # its loads are not kept for the next update
    trainer.loss = real
    trainer.scaler = FakeFloat16Scaler(skip=True)
    assert trainer.train_step(2, batch)["scaler_skipped"]
    assert torch.equal(bias(), before) and all(m.load_counts is None for m in layers)
    trainer.scaler = FakeFloat16Scaler(skip=False)
    assert "scaler_skipped" not in trainer.train_step(3, batch)
    assert not torch.equal(bias(), before)
