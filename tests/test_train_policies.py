"""Checkpoint policies of the spec at work in the trainer: resume and init_from."""

import pytest

from generated.parser import ConfigError, resolve
from helpers import metrics, trainer_args
from runtime.trainer.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(*argv):
    resolved = resolve(argv=list(argv))
    return Trainer(resolved.config, resolved)


def test_resume_with_another_architecture_is_an_error_naming_field_and_values(tmp_path, data_dir):
    assert trainer(*trainer_args(tmp_path, data_dir, "--training.max_iters", "2")).run() == 0
    with pytest.raises(ConfigError) as error:
        trainer(
            *trainer_args(
                tmp_path,
                data_dir,
                "--training.max_iters",
                "4",
                "--checkpointer.resume_from",
                "latest",
                "--model.n_routed_experts",
                "2",
                "--model.top_k",
                "1",
            )
        )
    message = str(error.value)
    assert (
        "model.n_routed_experts" in message
        and "it has 4" in message
        and "this run has 2" in message
    )


def test_resume_takes_from_checkpoint_fields_unless_given(tmp_path, data_dir):
    base = trainer_args(tmp_path, data_dir)
    # The first run used batch size 3; the resumed run does not say, so it keeps 3.
    assert trainer(*base, "--training.max_iters", "2", "--training.batch_size", "3").run() == 0
    idx = base.index("--training.batch_size")
    without_batch = base[:idx] + base[idx + 2 :]
    resumed = trainer(
        *without_batch, "--training.max_iters", "3", "--checkpointer.resume_from", "latest"
    )
    assert resumed.cfg.training.batch_size == 3
    assert any("training.batch_size" in note for note in resumed.config_notes)
    assert resumed.run() == 0
    assert [m["iter"] for m in metrics(tmp_path) if "loss" in m][-1] == 3


def test_init_from_checkpoint_takes_its_architecture_and_refuses_explicit_conflicts(
    tmp_path, data_dir
):
    first = tmp_path / "first"
    assert trainer(*trainer_args(first, data_dir, "--training.max_iters", "1")).run() == 0
    checkpoint = str(next((first / "checkpoints").glob("ckpt_*.pt")))
    # Model fields left at their defaults take the checkpoint's values ...
    adopted = trainer(
        "--out_dir",
        str(tmp_path / "second"),
        "--data.data_dir",
        data_dir,
        "--training.seq_len",
        "16",
        "--checkpointer.init_from",
        checkpoint,
    )
    assert adopted.cfg.model.dim == 32 and adopted.cfg.model.n_routed_experts == 4
    # ... and one set explicitly to something else is a clear error.
    with pytest.raises(ConfigError) as error:
        trainer(
            "--out_dir",
            str(tmp_path / "third"),
            "--data.data_dir",
            data_dir,
            "--training.seq_len",
            "16",
            "--model.dim",
            "48",
            "--checkpointer.init_from",
            checkpoint,
        )
    assert (
        "model.dim" in str(error.value)
        and "this run sets 48" in str(error.value)
        and checkpoint in str(error.value)
    )
