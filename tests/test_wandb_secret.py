"""wandb.api_key, the spec's secret field: the logger hands it to wandb (the run's settings), and it
never reaches config.yaml, a checkpoint's config, `config show`, the log or the wandb config."""

import sys
import types

import pytest
import torch

from generated.config import WandbConfig
from generated.parser import load_config, to_saved_dict
from helpers import run_trainer
from runtime.components.wandb_logger import WandbLogger
from runtime.configlib import SECRET_PLACEHOLDER

KEY = "sk-test-0123456789abcdef"  # a made-up API key
OTHER_KEY = "sk-test-fedcba9876543210"


class FakeRun:
    id = "fake"

    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def log_artifact(self, artifact, aliases):
        pass

    def finish(self):
        pass


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module recording what the logger gives it."""
    module = types.ModuleType("wandb")
    module.inits = []

    class Settings:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    def init(**kwargs):
        module.inits.append(kwargs)
        return FakeRun()

    module.Settings = Settings
    module.init = init
    module.Artifact = lambda **kwargs: types.SimpleNamespace(add_file=lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_the_key_goes_to_the_runs_settings_not_its_config(fake_wandb, tmp_path):
    config = load_config(argv=["--wandb.enabled", "true", "--wandb.api_key", KEY])
    logger = WandbLogger(
        config.wandb, out_dir=str(tmp_path), config_dict=to_saved_dict(config), is_main=True
    )
    logger.start()
    (init,) = fake_wandb.inits
    assert init["settings"].kwargs == {"api_key": KEY}
    assert init["config"]["wandb"]["api_key"] == SECRET_PLACEHOLDER
    assert KEY not in repr(init["config"])


def test_without_a_key_wandb_finds_its_own(fake_wandb, tmp_path):
    logger = WandbLogger(
        WandbConfig(enabled=True), out_dir=str(tmp_path), config_dict={}, is_main=True
    )
    logger.start()
    (init,) = fake_wandb.inits
    assert "settings" not in init


def test_a_failing_start_does_not_print_the_key(fake_wandb, tmp_path):
    from runtime.components.wandb_logger import WandbUnavailable

    def init(**kwargs):
        raise RuntimeError(f"bad key {kwargs['settings'].kwargs['api_key']}")

    fake_wandb.init = init
    logger = WandbLogger(
        WandbConfig(enabled=True, api_key=KEY), out_dir=str(tmp_path), config_dict={}
    )
    with pytest.raises(WandbUnavailable) as excinfo:
        logger.start()
    assert KEY not in str(excinfo.value) and SECRET_PLACEHOLDER in str(excinfo.value)


@pytest.mark.slow
def test_pinned_wandb_takes_the_key_and_runs_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.netrc must stay untouched
    config = load_config(argv=["--wandb.enabled", "true", "--wandb.api_key", KEY * 2])
    logger = WandbLogger(
        config.wandb, out_dir=str(tmp_path / "out"), config_dict=to_saved_dict(config)
    )
    logger.start()
    assert logger.run is not None
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    assert isinstance(wandb.Settings(api_key=KEY * 2), wandb.Settings)
    assert not (tmp_path / "home" / ".netrc").exists()
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert (KEY * 2).encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_a_training_run_keeps_the_key_out_of_everything_it_writes(
    fake_wandb, tmp_path, data_dir, monkeypatch, capsys
):
    monkeypatch.setenv("DSM_TEST_WANDB_KEY", KEY)
    out = tmp_path / "run"
    flags = ["--wandb.enabled", "true", "--wandb.api_key", "${env:DSM_TEST_WANDB_KEY}"]
    flags += ["--training.max_iters", "2", "--checkpointer.save_interval", "2"]
    flags += ["--evaluator.eval_interval", "2"]
    trainer = run_trainer(out, data_dir, *flags)
    assert trainer.cfg.wandb.api_key == KEY
    (init,) = fake_wandb.inits
    assert init["settings"].kwargs == {"api_key": KEY}
    assert KEY not in repr(init["config"])
    config_yaml = (out / "config.yaml").read_text()
    assert f"api_key: {SECRET_PLACEHOLDER}" in config_yaml and KEY not in config_yaml
    assert "# from environment DSM_TEST_WANDB_KEY (command line --wandb.api_key)" in config_yaml
    checkpoint = torch.load(out / "checkpoints" / "ckpt_0000002.pt", weights_only=True)
    assert checkpoint["config"]["wandb"]["api_key"] == SECRET_PLACEHOLDER
    assert KEY not in repr(checkpoint["config"])
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in capsys.readouterr().err

    # the resumed run takes the key from its own environment, not from the checkpoint
    monkeypatch.setenv("DSM_TEST_WANDB_KEY", OTHER_KEY)
    more = ["--training.max_iters", "3", "--checkpointer.resume_from", "latest"]
    again = run_trainer(out, data_dir, *flags, *more)
    assert again.resumed_from is not None and again.cfg.wandb.api_key == OTHER_KEY
    for path in out.rglob("*"):
        if path.is_file():
            assert OTHER_KEY.encode() not in path.read_bytes(), path
    assert fake_wandb.inits[-1]["settings"].kwargs == {"api_key": OTHER_KEY}
    from runtime.cli import config as config_cli

    capsys.readouterr()
    assert config_cli.main(["show", str(out / "config.yaml")]) == 0
    shown = capsys.readouterr().out
    assert KEY not in shown and OTHER_KEY not in shown
    assert "api_key: null" in shown  # the saved placeholder reads back as no key
    assert config_cli.main(["show", str(out / "config.yaml"), "--wandb.api_key", OTHER_KEY]) == 0
    shown = capsys.readouterr().out
    assert OTHER_KEY not in shown and f"api_key: {SECRET_PLACEHOLDER}" in shown
