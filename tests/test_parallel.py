"""Scaling out under torchrun with gloo on CPU: FSDP2, expert parallelism, both, resharding resumes,
a rank killed mid-save, per-process state bytes, and `plan`."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from test_train import ENV, PYTHON, REPO, args, free_port, losses, metrics

from generated.parser import load_config
from runtime.plan import count_params
from runtime.plan import main as plan_main
from runtime.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
# global batch: 4 micro-batches of 2 sequences, split over 1, 2 or 4 processes
COMMON = (
    "--training.max_iters", str(STEPS),
    "--training.gradient_accumulation_steps", "4",
    "--evaluator.eval_iters", "3",  # uneven over 2 and 4 processes: padded, uncounted forwards
    "--evaluator.eval_interval", "5",
    "--checkpointer.save_interval", "0",
    "--schedule.lr_decay_iters", str(STEPS),
)  # fmt: skip
DIST = ("--system.distributed.enabled", "true", "--system.distributed.backend", "gloo")


def torchrun(n, out, data_dir, *extra, env=None, check=True):
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "runtime", "train", *args(out, data_dir, *COMMON, *DIST, *extra),
    ]  # fmt: skip
    run_env = dict(ENV, PYTHONPATH=REPO, **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=run_env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_process(out, data_dir, *extra):
    trainer = Trainer(load_config(argv=args(out, data_dir, *COMMON, *extra)))
    assert trainer.run() == 0
    return trainer


def assert_same_losses(got, want, keys=("loss", "main_loss", "grad_norm", "val_loss")):
    for key in keys:
        a, b = losses(got, key), losses(want, key)
        assert len(a) == len(b) > 0, key
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The single-process run every layout must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    one_process(out, data_dir, "--checkpointer.save_interval", "5")
    return out


LAYOUTS = {  # fmt: skip
    # activation checkpointing and reshard_after_forward ride along: they must not change a loss
    "fsdp2": (
        2,
        [
            "--system.distributed.dp_shard",
            "2",
            "--system.distributed.activation_checkpointing",
            "full",
        ],
    ),
    "ep2": (
        2,
        [
            "--system.distributed.expert_parallel",
            "2",
            "--system.distributed.activation_checkpointing",
            "selective",
        ],
    ),
    "fsdp2_x_ep2": (
        4,
        [
            "--system.distributed.dp_shard",
            "2",
            "--system.distributed.expert_parallel",
            "2",
            "--system.distributed.reshard_after_forward",
            "false",
        ],
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_one_process(layout, reference, tmp_path, data_dir):
    n, flags = LAYOUTS[layout]
    torchrun(n, tmp_path / "run", data_dir, *flags)
    assert len(losses(tmp_path / "run")) == STEPS
    assert_same_losses(tmp_path / "run", reference)
    # the balancing bias moved identically: loads are summed over every process
    ckpt = tmp_path / "run" / "checkpoints" / f"ckpt_{STEPS:07d}"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "checksums.json").is_file()
    full = torch.load(reference / "checkpoints" / f"ckpt_{STEPS:07d}.pt", weights_only=True)
    from runtime.checkpoint import load_checkpoint

    sharded = load_checkpoint(str(ckpt))  # what export and sample read
    for key, value in full["model"].items():
        torch.testing.assert_close(sharded["model"][key], value, rtol=1e-4, atol=1e-5)


def test_resharding_resume_2_to_1_and_1_to_2(reference, tmp_path, data_dir):
    # saved by 2 FSDP processes at step 5, resumed on 1 process
    torchrun(2, tmp_path / "a", data_dir, "--system.distributed.dp_shard", "2",
             "--training.max_iters", "5", "--schedule.lr_decay_iters", str(STEPS))  # fmt: skip
    assert os.path.isdir(tmp_path / "a" / "checkpoints" / "ckpt_0000005")
    one_process(tmp_path / "a", data_dir, "--checkpointer.resume_from", "latest")
    assert_same_losses(tmp_path / "a", reference)
    # saved by 1 process (a single file) at step 5, resumed on 2 FSDP processes
    shutil.copytree(reference, tmp_path / "b")
    os.remove(tmp_path / "b" / "checkpoints" / f"ckpt_{STEPS:07d}.pt")
    torchrun(2, tmp_path / "b", data_dir, "--system.distributed.dp_shard", "2",
             "--checkpointer.resume_from", "latest")  # fmt: skip
    assert_same_losses(tmp_path / "b", reference)


def test_rank_killed_during_sharded_save_resumes_from_previous(reference, tmp_path, data_dir):
    flags = ("--system.distributed.dp_shard", "2", "--checkpointer.save_interval", "5",
             "--checkpointer.save_best", "false")  # fmt: skip
    # rank 1 dies after writing its shards of the second save (step 10)
    proc = torchrun(2, tmp_path / "k", data_dir, *flags, check=False,
                    env={"DEEPSEEK_MOE_FAULT": "checkpoint_write:2", "DEEPSEEK_MOE_FAULT_RANKS": "1"})  # fmt: skip
    assert proc.returncode != 0
    folder = tmp_path / "k" / "checkpoints"
    names = sorted(os.listdir(folder))
    assert "ckpt_0000005" in names and f"ckpt_{STEPS:07d}" not in names, names
    torchrun(2, tmp_path / "k", data_dir, *flags, "--checkpointer.resume_from", "latest")
    assert not any(n.endswith(".tmp") for n in os.listdir(folder))  # the half save was removed
    rows = metrics(tmp_path / "k")
    assert [r["iter"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert_same_losses(tmp_path / "k", reference)
    # keep_last_n 2 kept both; a damaged shard is an error naming its file
    from runtime.checkpoint import CheckpointError, load_checkpoint

    assert sorted(n for n in os.listdir(folder)) == ["ckpt_0000005", f"ckpt_{STEPS:07d}"]
    shard = folder / "ckpt_0000005" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__1_0.distcp"):
        load_checkpoint(str(folder / "ckpt_0000005"))


def test_fsdp_state_bytes_at_most_055_of_ddp(tmp_path, data_dir):
    """Weights + gradients + AdamW state per process, from live tensors (bench/fsdp_memory.py)."""
    from bench.fsdp_memory import measure

    ddp, fsdp = measure(tmp_path, data_dir)
    assert fsdp <= 0.55 * ddp, (fsdp, ddp)


def test_launch_layout_errors(tmp_path, data_dir, monkeypatch):
    from runtime.distributed import SystemConfigError
    from runtime.parallel import resolve_layout

    cfg = load_config(argv=["--system.distributed.dp_shard", "2", "--system.distributed.dp_replicate", "2"])  # fmt: skip
    with pytest.raises(SystemConfigError, match="dp_replicate.*dp_shard.*expert_parallel"):
        resolve_layout(cfg.system.distributed, 2)
    assert resolve_layout(cfg.system.distributed, 4).dp_replicate == 2
    auto = load_config(argv=["--system.distributed.expert_parallel", "2"]).system.distributed
    assert resolve_layout(auto, 8).dp_replicate == 4
    with pytest.raises(Exception, match="expert-parallel"):
        load_config(argv=["--system.distributed.expert_parallel", "3"])


# ------------------------------------------------------------------------------------- plan


def test_plan_tiny_agrees_with_the_live_model(capsys):
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"))
    from runtime.model import Transformer

    model = Transformer(cfg.model)
    main, mtp = count_params(cfg.model)
    live_mtp = sum(p.numel() for p in model.mtp.parameters())
    assert mtp.total == live_mtp and main.total == model.num_params() - live_mtp
    # activated: all but the (n_routed - top_k) unchosen experts of every MoE layer
    m = cfg.model
    expert = sum(p.numel() for p in model.layers[-1].ffn.experts.parameters()) // m.n_routed_experts
    moe_layers = m.n_layers - m.first_k_dense
    unchosen = (m.n_routed_experts - m.top_k) * expert
    assert main.active == main.total - moe_layers * unchosen - (m.vocab_size - 1) * m.dim
    assert plan_main([os.path.join(REPO, "configs", "tiny.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["main"]["total"] == main.total and not out["warnings"]


def test_plan_full_config_is_671b_37b(capsys):
    path = os.path.join(REPO, "configs", "deepseek_v3.yaml")
    code = plan_main([path, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert round(out["params"]["main"]["total"] / 1e9) == 671
    assert round(out["params"]["main"]["active"] / 1e9) == 37
    assert code == 1 and any("does not fit" in w for w in out["warnings"])  # DDP on one GPU
    flags = ["--world", "256", "--system.distributed.dp_shard", "32",
             "--system.distributed.expert_parallel", "8", "--training.batch_size", "1"]  # fmt: skip
    assert plan_main([path, "--json", *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_per_process_bytes"]["total"] < 80 * 1024**3
    assert plan_main([path, *flags]) == 0
    text = capsys.readouterr().out
    assert "671" in text and "FSDP2" in text


def test_plan_cli(tmp_path):
    proc = subprocess.run(
        [PYTHON, "-m", "runtime", "plan", os.path.join(REPO, "configs", "tiny.yaml")],
        cwd=REPO, capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0 and "activated per token" in proc.stdout, proc.stderr


def probe(config, *flags, n=2):
    """tests/peak_rss_probe.py's reports, one per process, of `n` processes building the Trainer."""
    cmd = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        os.path.join(REPO, "tests", "peak_rss_probe.py"), str(config), *flags,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(ENV, PYTHONPATH=REPO)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == n, proc.stdout
    return reports


def test_init_from_fills_each_process_shards_exactly(reference, tmp_path, data_dir):
    # every kind of source into a model sharded by FSDP2 or expert parallelism, built on the meta
    # device: each process reads only its blocks; gathered, the weights are the source's, bit for bit
    from test_hf_release import write_release_folder

    fp8_folder, _, _ = write_release_folder(tmp_path)  # block FP8, 3 shards, MTP layer
    torchrun(2, tmp_path / "dcp", data_dir, "--system.distributed.dp_shard", "2",
             "--training.max_iters", "2", "--checkpointer.save_interval", "2")  # fmt: skip
    config = tmp_path / "init.yaml"
    config.write_text("seed: 7\n")  # the architecture comes from each source
    ep2, fsdp2 = LAYOUTS["ep2"][1], LAYOUTS["fsdp2"][1]
    cases = {
        "checkpoint file": (reference / "checkpoints" / f"ckpt_{STEPS:07d}.pt", ep2),
        "sharded folder": (tmp_path / "dcp" / "checkpoints" / "ckpt_0000002", ep2),
        "fp8 release folder": (fp8_folder, fsdp2),
    }
    for name, (source, layout) in cases.items():
        reports = probe(config, "--checkpointer.init_from", str(source), "--out_dir",
                        str(tmp_path / name), "--data.data_dir", data_dir, "--training.seq_len", "16",
                        "--training.batch_size", "2", "--training.gradient_accumulation_steps", "2",
                        *DIST, *layout)  # fmt: skip
        for r in reports:
            assert r["compared"] > 10 and r["max_diff_vs_source"] == 0.0, (name, r)
            assert r["local_weights_mb"] < 0.75 * r["model_weights_mb"], (name, r)


BIG = ("--model.dim", "1024", "--model.n_layers", "6", "--model.n_heads", "8", "--model.inter_dim", "2048",
       "--model.n_routed_experts", "64", "--model.moe_inter_dim", "512")  # 2.3 GB of fp32 weights  # fmt: skip


def test_sharded_weights_are_never_whole_in_one_process(tmp_path):
    # built on the meta device, then each process fills only its shards: a 2.3 GB model on 2 processes
    # peaks at its 1.2 GB half plus the interpreter (~1.5 GB here); built whole first it peaked at 2.9
    reports = probe("configs/tiny.yaml", *BIG, "--training.gradient_accumulation_steps", "2",
                    "--out_dir", str(tmp_path / "o"), *DIST, "--system.distributed.dp_shard", "2")  # fmt: skip
    for r in reports:
        assert r["local_weights_mb"] == pytest.approx(r["model_weights_mb"] / 2, rel=0.01)
        assert r["peak_rss_mb"] < r["model_weights_mb"], r  # whole weights alone would exceed it


def test_init_from_a_release_folder_never_holds_the_whole_model(tmp_path):
    # the same 2.3 GB model as a bf16 Hugging Face folder (1.2 GB in 300 MB shards), init_from into 2
    # FSDP processes: each reads only its rows of each weight (1.7 GB peak RSS per process here;
    # reading the folder whole in every process, as before, peaked at 5.7 GB)
    from runtime.hf import export_hf
    from runtime.model import Transformer

    model = Transformer(load_config("configs/tiny.yaml", argv=list(BIG)).model)
    export_hf(model, str(tmp_path / "hf"), dtype="bfloat16", max_shard_size="300MB")
    del model
    config = tmp_path / "init.yaml"
    config.write_text("seed: 7\n")
    reports = probe(config, "--checkpointer.init_from", str(tmp_path / "hf"),
                    "--training.seq_len", "16", "--training.gradient_accumulation_steps", "2",
                    "--out_dir", str(tmp_path / "o"), *DIST, "--system.distributed.dp_shard", "2")  # fmt: skip
    for r in reports:
        assert r["compared"] > 100 and r["max_diff_vs_source"] == 0.0, r
        assert r["peak_rss_mb"] < r["model_weights_mb"], r
