"""Checkpoints: atomic writes, contents, retention, best.pt, resume (bit-exact), init_from."""

import json
import os
import random

import numpy as np
import pytest
import torch

from generated.parser import ConfigError, load_config, to_saved_dict
from helpers import TINY_RUN_FLAGS, metrics, run_trainer, trainer_args
from runtime.checkpoint import single_file as ckpt_mod
from runtime.checkpoint.format import (
    CheckpointError,
    capture_rng_state,
    checkpoint_name,
    restore_rng_state,
    step_checkpoints,
)
from runtime.checkpoint.manager import CheckpointManager, find_resume
from runtime.checkpoint.single_file import atomic_save, load_checkpoint
from runtime.components.metrics import VOLATILE_KEYS
from runtime.trainer.trainer import Trainer

# short evaluations, two warm-up steps
FLAGS = TINY_RUN_FLAGS + [
    "--evaluator.eval_iters",
    "2",
    "--schedule.warmup_iters",
    "2",
    "--schedule.lr_decay_iters",
    "20",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def config(out_dir, data_dir, *extra):
    return load_config(argv=trainer_args(out_dir, data_dir, *extra, flags=FLAGS))


def train(out_dir, data_dir, *extra):
    return run_trainer(out_dir, data_dir, *extra, flags=FLAGS)


# ---------------------------------------------------------------------------------------------


def test_checkpoint_name():
    assert checkpoint_name(3) == "ckpt_0000003.pt"


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "x.pt"
    atomic_save({"a": torch.ones(2)}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(2)}, str(path))
    assert os.listdir(tmp_path / "ck") == ["x.pt"]
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    atomic_save({"rng": state}, str(tmp_path / "r.pt"))
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


class _Plain:
    """A Stateful component whose state is a fixed dict."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def _checkpointer(tmp_path, **fields):
    """A CheckpointManager of a resolved config (save_dir is derived from out_dir when left null)
    over one stand-in model."""
    config = load_config(
        argv=["--out_dir", str(tmp_path), *[f"--checkpointer.{k}={v}" for k, v in fields.items()]]
    )
    return CheckpointManager(config.checkpointer, {"model": _Plain({})})


def test_checkpointer_policy_and_retention(tmp_path):
    c = _checkpointer(tmp_path, save_interval=2, keep_last_n=2, always_save_checkpoint="false")
    assert c.dir == os.path.join(str(tmp_path), "checkpoints")  # the derived default
    assert not c.should_save(1, final=False, improved=True)
    assert not c.should_save(2, final=False, improved=False)
    assert c.should_save(2, final=False, improved=True)
    assert c.should_save(3, final=True, improved=False)
    assert _checkpointer(tmp_path, save_interval=2).should_save(2, final=False, improved=False)
    assert not _checkpointer(tmp_path, save_interval=0).should_save(2, final=False, improved=True)
    other = tmp_path / "elsewhere"
    assert _checkpointer(tmp_path, save_dir=str(other)).dir == str(other)
    for step in range(1, 6):
        c.save(step, {"step": step})
    assert [s for s, _ in step_checkpoints(c.dir)] == [4, 5]
    empty = _checkpointer(tmp_path / "empty", resume_from="latest")
    assert find_resume(empty.cfg) == (None, None)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        find_resume(_checkpointer(tmp_path, resume_from=str(tmp_path / "nope.pt")).cfg)


def test_checkpoint_contents(tmp_path, data_dir):
    trainer = train(
        tmp_path / "out",
        data_dir,
        "--training.max_iters",
        "2",
        "--checkpointer.save_interval",
        "1",
        "--evaluator.eval_interval",
        "1",
    )
    folder = tmp_path / "out" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["best.pt", "ckpt_0000001.pt", "ckpt_0000002.pt"]
    state = torch.load(folder / "ckpt_0000002.pt", weights_only=True)
    assert {
        "model",
        "optimizer",
        "step",
        "rng",
        "data",
        "schedule",
        "balancer",
        "metrics",
        "config",
        "scaler",
    } <= set(state)
    assert state["format_version"] == ckpt_mod.FORMAT_VERSION
    assert state["step"] == 2 and state["data"] == {"next_step": 2}
    assert state["schedule"] == {"step": 2} and state["balancer"] == {}  # counts applied
    assert set(state["rng"]) >= {"python", "numpy", "torch", "cuda"}
    assert state["config"] == to_saved_dict(trainer.cfg)
    assert any(
        k.endswith("e_score_correction_bias") for k in state["model"]
    )  # router biases are saved
    assert state["optimizer"]["state"]  # AdamW moments
    assert isinstance(state["metrics"]["best_val_loss"], float)
    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["metrics"]["best_val_loss"] == min(
        r["val_loss"] for r in metrics(tmp_path / "out") if "val_loss" in r
    )


def test_keep_last_n_and_save_best(tmp_path, data_dir):
    train(
        tmp_path / "a",
        data_dir,
        "--training.max_iters",
        "4",
        "--checkpointer.save_interval",
        "1",
        "--checkpointer.keep_last_n",
        "2",
        "--checkpointer.save_best",
        "false",
        "--evaluator.eval_interval",
        "2",
    )
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == [
        "ckpt_0000003.pt",
        "ckpt_0000004.pt",
    ]
    # always_save_checkpoint false: interval saves only after an improving evaluation; the last one always
    train(
        tmp_path / "b",
        data_dir,
        "--training.max_iters",
        "4",
        "--checkpointer.save_interval",
        "1",
        "--checkpointer.keep_last_n",
        "0",
        "--checkpointer.always_save_checkpoint",
        "false",
        "--evaluator.eval_interval",
        "2",
        "--checkpointer.save_dir",
        str(tmp_path / "b_ck"),
    )
    names = sorted(os.listdir(tmp_path / "b_ck"))
    assert names == ["best.pt", "ckpt_0000002.pt", "ckpt_0000003.pt", "ckpt_0000004.pt"]
    assert not os.path.exists(tmp_path / "b" / "checkpoints")


def test_resume_is_bit_exact(tmp_path, data_dir):
    common = [
        "--training.log_interval",
        "1",
        "--evaluator.eval_interval",
        "3",
        "--checkpointer.save_interval",
        "3",
        "--moe.router_noise_scale",
        "0.05",
        "--moe.z_loss_weight",
        "0.001",
        "--mtp.warmup_steps",
        "4",
    ]
    train(tmp_path / "full", data_dir, "--training.max_iters", "6", *common)
    train(tmp_path / "part", data_dir, "--training.max_iters", "3", *common)
    # a stale line past the checkpoint (as if the first run had gone on and crashed) is dropped
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iter": 4, "loss": 0.0}) + "\n")
    resumed = train(
        tmp_path / "part",
        data_dir,
        "--training.max_iters",
        "6",
        "--checkpointer.resume_from",
        "latest",
        *common,
    )
    assert resumed.resumed_from.endswith("ckpt_0000003.pt")

    def strip(records):
        return [{k: v for k, v in r.items() if k not in VOLATILE_KEYS} for r in records]

    full, part = strip(metrics(tmp_path / "full")), strip(metrics(tmp_path / "part"))
    assert [r["iter"] for r in part if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert part == full  # losses, MoE stats and val losses, exactly
    a = torch.load(tmp_path / "full" / "checkpoints" / "ckpt_0000006.pt", weights_only=True)[
        "model"
    ]
    b = torch.load(tmp_path / "part" / "checkpoints" / "ckpt_0000006.pt", weights_only=True)[
        "model"
    ]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming from an explicit file, into a folder of its own; not into another run's folder
    ckpt3 = str(tmp_path / "full" / "checkpoints" / "ckpt_0000003.pt")
    again = Trainer(
        config(
            tmp_path / "again",
            data_dir,
            "--checkpointer.resume_from",
            ckpt3,
            "--training.max_iters",
            "6",
            *common,
        )
    )
    assert again.step == 3 and again.run_id == load_checkpoint(ckpt3)["run_id"]
    with pytest.raises(ConfigError, match="holds run .* but checkpoint .* is of run"):
        Trainer(config(tmp_path / "part", data_dir, "--checkpointer.resume_from", ckpt3, *common))


def test_init_from_checkpoint_and_hf_folder(tmp_path, data_dir):
    first = train(tmp_path / "first", data_dir, "--training.max_iters", "1")
    path = str(tmp_path / "first" / "checkpoints" / "ckpt_0000001.pt")
    # the same architecture loads the checkpoint's weights; a different explicit one is refused
    trainer = Trainer(config(tmp_path / "second", data_dir, "--checkpointer.init_from", path))
    assert trainer.step == 0 and trainer.cfg.model.dim == 32
    saved = load_checkpoint(path)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in trainer.model.state_dict().items())
    with pytest.raises(ConfigError, match="model.dim: this run sets 48"):
        Trainer(
            config(
                tmp_path / "second", data_dir, "--checkpointer.init_from", path, "--model.dim", "48"
            )
        )

    from runtime.interop.hf_folder import export_hf

    export_hf(first.model, str(tmp_path / "hf"))
    trainer = Trainer(
        config(tmp_path / "third", data_dir, "--checkpointer.init_from", str(tmp_path / "hf"))
    )
    assert trainer.cfg.model.n_layers == 2
    assert all(
        torch.equal(v, first.model.state_dict()[k]) for k, v in trainer.model.state_dict().items()
    )
    with pytest.raises(
        ConfigError, match="model.n_layers: this run sets 3 but .*config.json has 2"
    ):
        Trainer(
            config(
                tmp_path / "third",
                data_dir,
                "--checkpointer.init_from",
                str(tmp_path / "hf"),
                "--model.n_layers",
                "3",
            )
        )
    with pytest.raises(CheckpointError):
        Trainer(
            config(
                tmp_path / "fourth", data_dir, "--checkpointer.init_from", str(tmp_path / "nothing")
            )
        )


def test_sharded_folders_of_the_earlier_format_still_load(tmp_path):
    """DCP folders now hold the optimizer's param groups per parameter (pipeline stages hold
    different parameters); a folder written with them as one list still loads, every state equal."""
    import torch.distributed.checkpoint as dcp

    from generated.config import OptimizerConfig
    from helpers import make_model
    from runtime.checkpoint.dcp import OLD_PARAM_GROUPS, _dcp_state, _saved_flat, load_into
    from runtime.components.optimizer import build_optimizer

    torch.manual_seed(0)
    model = make_model()
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.01))
    out = model(torch.randint(0, 256, (1, 9)), mtp=True)  # every weight gets a gradient
    (out.logits.sum() + sum(m.sum() for m in out.mtp_logits)).backward()
    optimizer.step()
    for flat in (False, True):
        folder = str(tmp_path / f"flat{flat}")
        dcp.save(_dcp_state(model, optimizer, flat=flat), checkpoint_id=folder)
        assert _saved_flat(folder) == flat
        fresh = make_model()
        fresh_optimizer = build_optimizer(fresh, OptimizerConfig(lr=0.5))
        load_into(fresh, fresh_optimizer, folder)
        for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), name
        assert [g["lr"] for g in fresh_optimizer.param_groups] == [0.01, 0.01]
        saved, loaded = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
        assert all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)
    assert OLD_PARAM_GROUPS.match("optim.param_groups.0.lr")
