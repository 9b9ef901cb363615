"""Weights & Biases logging for the `wandb` section (WandbConfig).

wandb is imported only when enabled; an enabled run without wandb installed fails before training
starts. Set WANDB_MODE=offline to log without a network (the run lands in `<out_dir>/wandb`).

`wandb.api_key` (a secret field, best `${env:NAME}`) goes to the run's settings,
`wandb.init(settings=wandb.Settings(api_key=...))`: wandb 0.31 logs in with it for this run
without writing it to ~/.netrc (as `wandb.login(key=...)` would), and an offline run ignores it.
Unset, wandb finds its own credentials (WANDB_API_KEY, ~/.netrc). The config dict the run gets is
the saved one, where the key is a placeholder.
"""

import os
from typing import Any

from generated import PATH
from generated.config import WandbConfig
from runtime.configlib import SECRET_PLACEHOLDER


class WandbUnavailable(RuntimeError):
    """wandb.enabled is true but wandb cannot be imported or cannot start a run."""


def import_wandb() -> Any:
    try:
        import wandb
    except ImportError as error:
        raise WandbUnavailable(
            f"{PATH.wandb.enabled} is true but wandb cannot be imported ({error}); "
            f"pip install wandb or set --{PATH.wandb.enabled} false"
        ) from None
    return wandb


class WandbLogger:
    """No-op unless `wandb_cfg.enabled` (and this is the main process). Construction checks that
    wandb imports (on every rank: fail before anything is built); start() opens the run."""

    def __init__(
        self, wandb_cfg: WandbConfig, *, out_dir: str, config_dict: dict, is_main: bool = True
    ):
        self.enabled = wandb_cfg.enabled and is_main
        self.log_model = wandb_cfg.log_model
        self.run: Any = None
        self._wandb: Any = None
        self._init_args: dict[str, Any] | None = None
        self._api_key: str | None = None
        if not wandb_cfg.enabled:
            return
        wandb = import_wandb()
        if not is_main:
            return
        self._wandb = wandb
        self._api_key = wandb_cfg.api_key
        self._init_args = dict(
            project=wandb_cfg.project,
            name=wandb_cfg.run_name,
            tags=list(wandb_cfg.tags),
            config=config_dict,
            dir=out_dir,
        )

    def start(self) -> None:
        if self._init_args is None or self.run is not None:
            return
        os.makedirs(self._init_args["dir"], exist_ok=True)
        try:
            args = dict(self._init_args)
            if self._api_key is not None:
                args["settings"] = self._wandb.Settings(api_key=self._api_key)
            self.run = self._wandb.init(**args)
        except Exception as error:  # noqa: BLE001 - no API key, no network, a bad project...
            text = str(error).strip()
            if self._api_key:  # wandb's message must not carry the key into the log
                text = text.replace(self._api_key, SECRET_PLACEHOLDER)
            first_line = text.splitlines()[0] if text else type(error).__name__
            raise WandbUnavailable(
                f"wandb could not start a run ({first_line}); log in (wandb login / WANDB_API_KEY), "
                f"set WANDB_MODE=offline, or pass --{PATH.wandb.enabled} false"
            ) from None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        flat = {k: v for k, v in metrics.items() if not isinstance(v, (list, tuple, dict))}
        self.run.log(flat, step=step)

    def log_checkpoint(self, path: str, step: int, alias: str = "latest") -> None:
        """Upload a saved checkpoint as a new version of the run's model artifact (when `log_model`),
        tagged `step-N` and `alias` (`latest` for step checkpoints, `best` for best.pt)."""
        if self.run is None or not self.log_model:
            return
        artifact = self._wandb.Artifact(
            name=f"model-{self.run.id}", type="model", metadata={"step": step}
        )
        artifact.add_file(path, name=os.path.basename(path))
        self.run.log_artifact(artifact, aliases=[f"step-{step}", alias])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
