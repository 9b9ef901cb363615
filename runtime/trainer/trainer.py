"""`python -m runtime train CONFIG [--section.field VALUE ...]`: the training loop.

Step numbering: `Trainer.step` counts optimizer steps done. Optimizer step `s` (0-based) uses
lr_at(s) and the loss of step s (runtime/components/loss.py); once it is done the run is at `iter = s + 1`, which is what
metrics.jsonl, evaluations and checkpoint names (`ckpt_{iter:07d}.pt`) refer to.

Faults: SIGTERM / SIGINT stop the run after the current step with a checkpoint (exit 0; a second
signal stops at once); a resumed run truncates metrics.jsonl to its checkpoint's step; see
runtime/checkpoint/single_file.py for checksums, `latest` fallback and test-only fault injection.

Logs (runtime/components/logs.py): the console and <out_dir>/train.log get the same timestamped lines, one per
`log_interval` steps (step, loss, lr, tokens/s, ETA) and one per evaluation. A tqdm bar is shown
only when stderr is a terminal, so a log piped to a file reads line by line.

Run folders (runtime/trainer/run_folder.py): a fresh run into an out_dir holding another run's files is a
config error unless `overwrite`; `resume_from latest` takes only the folder's own run's checkpoints.

Per optimizer step, `training.gradient_accumulation_steps` micro-batches of `batch_size` windows
are processed across all processes together (each process runs accum / world_size of them, with
DDP gradient sync on its last one only); every micro-loss is divided by the per-process count and
DDP averages over processes, so the update equals the single-process one with the same settings.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, Self, cast

import numpy as np
import torch
from torch import nn

from generated import PATH
from generated.config import Config, MoETrainingConfig, OptimizerConfig
from generated.names import InitFrom, NonfiniteLoss, ResumeFrom
from generated.parser import (
    ConfigError,
    Problem,
    Resolved,
    Source,
    adopt_values,
    dump_yaml,
    reconcile_with_checkpoint,
    resolve,
    resolved_from_config,
    to_saved_dict,
)
from runtime.checkpoint.dcp import ShardedCheckpointer, load_full_into, load_into
from runtime.checkpoint.single_file import (
    Checkpointer,
    CheckpointError,
    RNGState,
    checkpoint_dict,
    describe_os_error,
    fault_point,
    load_components,
)
from runtime.cli import console
from runtime.components import logs
from runtime.components.data import DataError, DataModule, EvalBatchSampler
from runtime.components.logs import log
from runtime.components.lr_schedule import LRSchedule, schedule_warnings
from runtime.components.metrics import MetricsWriter, plot_losses
from runtime.components.tokenizer import TOKENIZER_FILE, TextCodec
from runtime.components.wandb_logger import WandbLogger, WandbUnavailable
from runtime.distributed import utils as dist_utils
from runtime.models.deepseek_v3 import parallelize as parallel
from runtime.trainer.run_folder import (
    SAMPLE_NAME,
    claim_for_fresh_start,
    new_run_id,
    read_run_id,
    write_run_file,
)

if TYPE_CHECKING:
    from tqdm import tqdm

    from runtime.models.deepseek_v3.model import Transformer


class NonFiniteLossError(RuntimeError):
    """training.nonfinite_loss is `stop` and a step's loss was NaN or infinite."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from the root `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def router_noise_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the router noise of one optimizer step on one process: different on every rank
    (the noise of a data-parallel run must not repeat across processes) and a function of the step,
    so a resumed run draws the same noise as an uninterrupted one."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


@contextlib.contextmanager
def router_noise_rng(
    moe_cfg: MoETrainingConfig, seed: int, rank: int, step: int, device: torch.device
) -> Iterator[None]:
    """Run the step's forwards with the global RNG seeded by router_noise_seed (only when router
    noise is on; the RNG state outside is left as it was)."""
    if moe_cfg.router_noise_scale == 0:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(router_noise_seed(seed, rank, step))
        yield


def build_optimizer(model: nn.Module, optimizer: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW from OptimizerConfig. Weight decay goes to parameters with ndim >= 2 (the linear
    weights, expert matrices and the token embedding); biases and norm weights (ndim < 2) get
    none, and the router's correction bias is a buffer, never optimised."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": optimizer.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (one pass over all tensors) exists on CPU and CUDA and is much faster than
    # the per-tensor loop; it is deterministic, so resumed runs stay bit-exact.
    return torch.optim.AdamW(
        groups,
        lr=optimizer.lr,
        betas=(optimizer.beta1, optimizer.beta2),
        eps=optimizer.eps,
        fused=True,
    )


class StopSignals:
    """While active (main thread only), SIGTERM and SIGINT set `received` (the signal's name) so
    that the loop stops after its current step; a second one restores the previous handlers and is
    re-delivered, i.e. stops at once. Nothing is printed from the handler (stderr is not reentrant)."""

    NAMES = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            return
        self.__exit__()
        os.kill(os.getpid(), signum)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


class Trainer:
    """Builds everything from the root Config and runs training (`run()` returns an exit code)."""

    def __init__(self, cfg: Config, resolved: Resolved | None = None) -> None:
        """`resolved` (from generated.parser.resolve) says which values were set explicitly; the
        checkpoint policies of the spec use it on resume and for init_from."""
        resolved = resolved if resolved is not None else resolved_from_config(cfg)
        launch_main = dist_utils.launch_world()[1] == 0
        logs.configure(enabled=launch_main)
        # ---- the config: reconciled with a resumed checkpoint, or with init_from's architecture
        self.checkpointer = Checkpointer(resolved.config.checkpointer)
        resume_from, out_dir = resolved.config.checkpointer.resume_from, resolved.config.out_dir
        folder_run = read_run_id(out_dir) if resume_from == ResumeFrom.LATEST else None
        resume_path, self.resume_state = self.checkpointer.load_resume(
            warn=self._warn, run_id=folder_run
        )
        self.resumed_from = resume_path
        load_weights: Callable[[Transformer], None] | None = None
        if self.resume_state is not None:
            assert resume_path is not None  # load_resume returns a state with its path
            resolved, self.config_notes = reconcile_with_checkpoint(
                resolved, self.resume_state["config"], resume_path
            )
        else:
            resolved, load_weights = self._init_from(resolved)
            self.config_notes = []
        self.cfg: Config
        self.cfg = cfg = resolved.config
        training = cfg.training
        system = cfg.system
        # ---- the run folder: claimed before anything is written to it
        self.run_id = self._claim_run_folder(cfg) if launch_main else None
        if not cfg.evaluator.eval_only:
            for text in schedule_warnings(cfg.schedule, training.max_iters):
                self._warn(f"warning: {text}")
        # ---- processes (checked once, here), the wandb package, data (checks its layout), device
        launch = dist_utils.check_launch(system.distributed)
        self.config_dict = to_saved_dict(cfg)
        self.wandb = WandbLogger(
            cfg.wandb, out_dir=cfg.out_dir, config_dict=self.config_dict, is_main=launch.is_main
        )
        self.window = training.seq_len + 1 + cfg.model.mtp_depth
        self.data = DataModule(
            cfg.data,
            seed=cfg.seed,
            window=self.window,
            batch_size=training.batch_size,
            grad_accum=training.gradient_accumulation_steps,
            world_size=launch.world_size,
            rank=launch.rank,
            vocab_size=cfg.model.vocab_size,
        )
        # text <-> tokens for the sample, the checkpoint and export; None for a pre-tokenized .bin
        self.codec: TextCodec | None = self.data.corpus.codec or (
            TextCodec.bytes() if self.data.corpus.is_bytes else None
        )
        self.device = dist_utils.resolve_device(
            system.device, launch.local_rank, distributed=launch.world_size > 1
        )
        if self.device.type == "cpu":
            dist_utils.tune_malloc()  # reuse freed blocks: fresh pages are slow to fault in here
        self.dist = dist_utils.init_distributed(launch, system.distributed, self.device.type)
        self.is_main = self.dist.is_main
        if self.is_main and not cfg.evaluator.eval_only:
            self.checkpointer.check_writable()
        self.dtype = dist_utils.autocast_dtype(system.device)
        slow = dist_utils.slow_cpu_dtype(self.device, self.dtype, PATH.system.device.dtype)
        if slow and self.is_main:
            warnings.warn(slow, stacklevel=1)
        self.nonfinite_policy = NonfiniteLoss(training.nonfinite_loss)
        seed_everything(cfg.seed)

        for note in self.config_notes:
            self._say(f"config: {note}")
        from runtime.components.balancer import MoEBalancer
        from runtime.components.loss import TrainingLoss
        from runtime.models.deepseek_v3.model import Transformer
        from runtime.models.deepseek_v3.moe import RoutingKnobs

        # ---- the components: each owns its part of the run's state
        # sharded: built on the meta device and sharded before any weight exists; each process then
        # fills in only its shards (Transformer.init_weights), and init_from reads only those
        on_meta = parallel.resolve_layout(system.distributed, self.dist.world_size).sharded
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            self.model = Transformer(cfg.model, RoutingKnobs.from_config(cfg.moe))
        if not on_meta:
            if load_weights is not None:
                load_weights(self.model)
            self.model.to(self.device)
        # FSDP2 / expert parallel / activation checkpointing, in place (runtime/models/deepseek_v3/parallelize.py)
        self.parallel = parallel.setup(self.model, cfg, self.dist, self.device)
        if on_meta:
            self.model.to_empty(device=self.device)
            self.model.init_weights()  # MTP modules a source has no weights for keep these
            if load_weights is not None:
                load_weights(self.model)
        self.loss = TrainingLoss(cfg.moe, cfg.mtp)
        self.balancer = MoEBalancer(self.model, cfg.moe)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        if self.parallel.sharded:  # collective DCP folders instead of rank 0's single files
            self.checkpointer = ShardedCheckpointer(
                cfg.checkpointer, self.model, self.optimizer, self.dist.rank, self.dist.world_size
            )
        self.saves_here = self.is_main or self.parallel.sharded
        self.scaler = dist_utils.grad_scaler(self.device, self.dtype, self.parallel.sharded)
        self.lr_schedule = LRSchedule(cfg.schedule, cfg.optimizer.lr)
        self.metrics = MetricsWriter(cfg.out_dir, enabled=self.is_main, run_id=self.run_id)
        # the signal's name when SIGTERM / SIGINT ended the run early
        self.stopped_by: str | None = None

        # ---- wrappers for training: compile, then DDP
        self.train_module = dist_utils.compile_module(self.model, system.compile)
        if self.dist.enabled and not self.parallel.sharded:
            self.train_module = dist_utils.wrap_ddp(
                self.train_module, system.distributed, self.device
            )

        # ---- outputs
        self.out_dir = cfg.out_dir
        self.bytes_per_token = self.data.corpus.bytes_per_token  # None: unknown (a .bin corpus)
        self.wandb.start()
        self.eval_cfg = cfg.evaluator
        self.tokens_per_step = (
            training.batch_size * training.seq_len * training.gradient_accumulation_steps
        )
        if self.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
                f.write(dump_yaml(cfg))
            if self.codec is not None:
                self.codec.save(os.path.join(cfg.out_dir, TOKENIZER_FILE))
        # ---- a resumed run loads every component last (the RNG after all setup has drawn)
        if self.resume_state is not None:
            self._load_resume(self.resume_state)

    def _load_resume(self, state: dict[str, Any]) -> None:
        """Load a checkpoint into the components. A sharded folder (DCP) or a single file loaded
        onto a sharded model puts the weights and optimizer state in place first (each process
        keeps its shards); everything else loads as from a single file."""
        components = self.components()
        if state.get("sharded") or self.parallel.sharded:
            if state.get("sharded"):  # resharded onto this layout
                load_into(self.model, self.optimizer, state["sharded"])
            else:
                load_full_into(self.model, self.optimizer, state)
            components = {k: v for k, v in components.items() if k not in ("model", "optimizer")}
        assert self.resumed_from is not None  # the path of `state`, set with it in __init__
        load_components(components, state, self.resumed_from)

    def components(self) -> dict[str, Any]:
        """The run's Stateful parts, by checkpoint key (the RNG last: loading it restores it)."""
        parts = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scaler": self.scaler,  # {} unless float16
            "schedule": self.lr_schedule,
            "data": self.data,
            "balancer": self.balancer,
            "metrics": self.metrics,
            "rng": RNGState(),
        }
        return parts

    @property
    def step(self) -> int:
        """Optimizer steps done (the schedule's position)."""
        return self.lr_schedule.step

    @step.setter
    def step(self, value: int) -> None:
        self.lr_schedule.step = value

    def checkpoint_state(self) -> dict[str, Any]:
        meta = {
            "step": self.step,
            "run_id": self.run_id,
            "tokenizer": self.codec.state() if self.codec is not None else None,
            "config": self.config_dict,
        }
        return checkpoint_dict(self.components(), meta)

    # ------------------------------------------------------------------------------------------
    # setup helpers

    @staticmethod
    def _warn(text: str) -> None:
        log.warning(text)  # non-main processes have no handlers

    def _say(self, text: str) -> None:
        log.info(text)

    def _claim_run_folder(self, cfg: Config) -> str:
        """The run id, after making sure out_dir holds no other run's files (main process only)."""
        out_dir, state = cfg.out_dir, self.resume_state
        folder_run = read_run_id(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        if cfg.evaluator.eval_only:  # writes one metrics row, claims nothing
            run_id = (state or {}).get("run_id") or folder_run or new_run_id()
        elif state is not None:
            run_id = state.get("run_id") or folder_run or new_run_id()
            if folder_run is not None and folder_run != run_id and not cfg.overwrite:
                message = (
                    f"{out_dir} holds run {folder_run}, but checkpoint {self.resumed_from} is of run "
                    f"{run_id}; resume into that run's {PATH.out_dir}, or pass --{PATH.overwrite} true"
                )
                raise ConfigError(
                    [Problem(PATH.out_dir, message, Source("file", out_dir, 0), "file")]
                )
            write_run_file(out_dir, run_id)
        else:
            # resume_from latest with no checkpoint yet: the folder's own run starts over
            restart = cfg.checkpointer.resume_from is not None and folder_run is not None
            removed = claim_for_fresh_start(
                out_dir, self.checkpointer.dir, overwrite=cfg.overwrite, restart_same_run=restart
            )
            run_id = cast(str, folder_run) if restart else new_run_id()  # restart: folder_run set
            write_run_file(out_dir, run_id)
            if removed:
                self._say(f"removed {len(removed)} files of the previous run in {out_dir}")
        logs.add_file(os.path.join(out_dir, logs.LOG_NAME))
        self._say(
            f"run {run_id} in {out_dir}" + (f", resumed from {self.resumed_from}" if state else "")
        )
        return run_id

    @staticmethod
    def _init_from(resolved: Resolved) -> tuple[Resolved, Callable[[Transformer], None] | None]:
        """(resolved config, weight loader or None) for checkpointer.init_from: scratch, or any
        source runtime/interop/sources.py recognises. The source's architecture fills the model section; a
        model field this run sets explicitly to another value is a config error."""
        path = resolved.config.checkpointer.init_from
        if path == InitFrom.SCRATCH:
            return resolved, None
        from runtime.interop.sources import UnknownSource, load_source

        try:
            source = load_source(path)
        except UnknownSource as error:
            raise CheckpointError(
                f"{PATH.checkpointer.init_from} must be {InitFrom.SCRATCH!r} or a model source; {error}"
            ) from None
        except ValueError as error:  # an unsupported Hugging Face setting, named by its key
            problem = Problem(PATH.checkpointer.init_from, str(error), Source("file", path, 1))
            raise ConfigError([problem]) from None
        fields = {f"{PATH.model.SECTION}.{k}": v for k, v in source.model_fields.items()}
        return adopt_values(resolved, fields, source.config_file), source.load_weights

    # ------------------------------------------------------------------------------------------
    # steps

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        return dist_utils.autocast_context(self.device, self.dtype)

    def train_step(self, step: int, micro_batches: Sequence[torch.Tensor]) -> dict[str, Any]:
        """One optimizer step over this process's micro-batches; returns its metrics (global means)."""
        cfg = self.cfg
        lr = self.lr_schedule.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n = len(micro_batches)
        depth = cfg.model.mtp_depth
        sums = torch.zeros(4 + depth, dtype=torch.float64, device=self.device)
        mtp_weight = 0.0
        noise = router_noise_rng(cfg.moe, cfg.seed, self.dist.rank, step, self.device)
        with noise:
            for j, window in enumerate(micro_batches):
                window = window.to(self.device, non_blocking=True)
                last = j == n - 1
                sync = parallel.grad_sync(self.train_module, last or not self.dist.enabled)
                with sync:
                    with self._autocast():
                        out = self.loss(self.train_module, window, step)
                    self.scaler.scale(out.loss / n).backward()
                parts = [out.loss, out.main_loss, out.aux_loss, out.z_loss, *out.mtp_losses]
                sums += torch.stack([p.detach().double() for p in parts])
                mtp_weight = out.mtp_weight
        fault_point("step")
        dist_utils.all_reduce_sum(sums, self.dist)
        means = (sums / (n * self.dist.world_size)).tolist()
        metrics: dict[str, Any] = {
            "loss": means[0],
            "main_loss": means[1],
            "aux_loss": means[2],
            "z_loss": means[3],
            **{f"mtp_loss_{k + 1}": means[4 + k] for k in range(depth)},
            "mtp_weight": float(mtp_weight),
            "lr": lr,
            "phase": self.lr_schedule.phase(step),
        }
        if not math.isfinite(means[0]):
            if self.nonfinite_policy == NonfiniteLoss.STOP:
                raise NonFiniteLossError(
                    f"non-finite loss ({means[0]}) at step {step + 1}; set {PATH.training.nonfinite_loss}: "
                    f"{NonfiniteLoss.SKIP} to drop such steps"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.balancer.discard()  # a step not applied moves no bias
            metrics["skipped"] = True
            return metrics
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if cfg.optimizer.grad_clip > 0:
            if self.parallel.sharded:  # parameters on several meshes
                norm = parallel.clip_grad_norm(
                    self.model.parameters(), cfg.optimizer.grad_clip, self.dist.world_size
                )
            else:
                norm = torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), cfg.optimizer.grad_clip
                )
            metrics["grad_norm"] = float(norm)
            # an inf/NaN gradient with a finite loss would turn the weights into NaN; with float16
            # the GradScaler skips such steps itself
            if not math.isfinite(metrics["grad_norm"]) and not self.scaler.is_enabled():
                if self.nonfinite_policy == NonfiniteLoss.STOP:
                    raise NonFiniteLossError(
                        f"non-finite gradient norm ({metrics['grad_norm']}) at step {step + 1}; set "
                        f"{PATH.training.nonfinite_loss}: {NonfiniteLoss.SKIP} to drop such steps"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                self.balancer.discard()
                metrics["skipped"] = True
                return metrics
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # the float16 scaler skips a step with inf/NaN gradients and then lowers its scale
        if scale is not None and self.scaler.get_scale() < scale:
            self.balancer.discard()
            metrics["scaler_skipped"] = True
        else:
            self.balancer.update(step)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean main (next-token) loss over the `eval_iters` fixed validation batches."""
        was_training = self.model.training
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        # sharded: every process runs as many forwards (their collectives pair up); repeats uncounted
        loader = self.data.val_loader(self.eval_cfg.eval_iters, even=self.parallel.sharded)
        for i, window in enumerate(loader):
            window = window.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.loss(self.model, window, self.step)
            if i < cast(EvalBatchSampler, loader.batch_sampler).counted:
                totals += torch.stack([out.main_loss.detach().double(), totals.new_ones(())])
            fault_point("eval")
        dist_utils.all_reduce_sum(totals, self.dist)
        self.model.train(was_training)
        return float(totals[0] / totals[1])

    def _record_eval(self, val_loss: float) -> bool:
        improved = self.metrics.note_val_loss(val_loss)
        best_val_loss = self.metrics.best_val_loss
        record = {"iter": self.step, "val_loss": val_loss, "best_val_loss": best_val_loss}
        bpb = ""
        if self.bytes_per_token is not None:
            # nats per token -> bits per byte of text: comparable across tokenizers
            record["val_bpb"] = val_loss / math.log(2) / self.bytes_per_token
            bpb = f", {record['val_bpb']:.4f} bits/byte"
        self.metrics.write(record)
        self.wandb.log({k: v for k, v in record.items() if k != "iter"}, step=self.step)
        best = "none" if best_val_loss is None else f"{best_val_loss:.4f}"
        self._say(f"step {self.step}: val loss {val_loss:.4f}{bpb} (best {best})")
        return improved

    # ------------------------------------------------------------------------------------------
    # the run

    def run(self) -> int:
        try:
            if self.eval_cfg.eval_only:
                self._record_eval(self.evaluate())
            else:
                self._train()
                if self.is_main and self.stopped_by is None:
                    plot_losses(self.out_dir)
                # a sharded model generates with every process (each forward gathers the weights
                # or sends tokens to the experts' processes); only the main one prints and saves
                sample = self.cfg.sample.max_new_tokens > 0 and self.stopped_by is None
                if sample and (self.is_main or self.parallel.sharded):
                    self.sample()
        finally:
            self.wandb.finish()
        dist_utils.barrier(self.dist)
        logs.close()
        return 0

    def _train(self) -> None:
        # a fresh start found (or made) the folder free of other runs' files: nothing to truncate
        if self.resume_state is not None:
            self.metrics.truncate_after(self.step)
            self._say(f"resumed from {self.resumed_from} at step {self.step}")
        if self.is_main:
            for path in self.checkpointer.remove_stale_temps():
                self._say(f"removed {path} (an interrupted checkpoint write)")
        self.resume_state = None  # free the memory
        bar = None
        log_console = logs.console_handler()
        if self.is_main and sys.stderr.isatty():  # a bar in a file is one long line of \r updates
            from tqdm import tqdm

            bar = tqdm(
                total=self.cfg.training.max_iters,
                initial=self.step,
                dynamic_ncols=True,
                desc="train",
            )
            if log_console is not None:
                log_console.bar = bar
        try:
            with StopSignals() as signals:
                self._loop(signals, bar)
        finally:
            if log_console is not None:
                log_console.bar = None
            if bar is not None:
                bar.close()  # ends the bar's line, so that an error message starts a line of its own

    def _stop_requested(self, signals: StopSignals) -> bool:
        """Whether any process got SIGTERM / SIGINT (all processes agree, so all stop together)."""
        if not self.dist.enabled:
            return signals.received is not None
        flag = torch.tensor([float(signals.received is not None)], device=self.device)
        return bool(dist_utils.all_reduce_sum(flag, self.dist).item() > 0)

    def _loop(self, signals: StopSignals, bar: tqdm | None) -> None:
        cfg = self.cfg
        max_iters = cfg.training.max_iters
        self.model.train()
        steps = self.data.train_steps(max_iters)
        last_eval = None
        window_tokens, window_time = 0, 0.0
        log_interval = cfg.training.log_interval
        first_step, loop_start = self.step, time.perf_counter()
        self._say(
            f"training steps {self.step + 1}-{max_iters} ({self.tokens_per_step:,} tokens per step)"
        )
        while self.step < max_iters:
            step = self.step
            will_log = (step + 1) % log_interval == 0 or step + 1 == max_iters
            if will_log:
                self.balancer.reset_stats()
            start = time.perf_counter()
            micro = next(steps)
            metrics = self.train_step(step, micro)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            window_time += time.perf_counter() - start
            window_tokens += self.tokens_per_step
            self.step = step + 1
            tokens_per_s = window_tokens / max(window_time, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    lr=f"{metrics['lr']:.2e}",
                    tok_s=f"{tokens_per_s:,.0f}",
                )
            if will_log:
                record = {
                    "iter": self.step,
                    **metrics,
                    "tokens_per_s": tokens_per_s,
                    **self.balancer.stats(),
                }
                self.metrics.write(record)
                self.wandb.log(record, step=self.step)
                window_tokens, window_time = 0, 0.0
                per_step = (time.perf_counter() - loop_start) / (self.step - first_step)
                skipped = " (skipped)" if metrics.get("skipped") else ""
                self._say(
                    f"step {self.step}/{max_iters} | loss {metrics['loss']:.4f}{skipped} | lr {metrics['lr']:.2e} | "
                    f"{tokens_per_s:,.0f} tok/s | eta {logs.format_duration(per_step * (max_iters - self.step))}"
                )
            final = self.step == max_iters
            if self.step % self.eval_cfg.eval_interval == 0 or final:
                improved = self._record_eval(self.evaluate())
                last_eval = self.step
                if improved and self.checkpointer.keep_best and self.saves_here:
                    path = self.checkpointer.save_best(self.checkpoint_state())
                    self.wandb.log_checkpoint(path, self.step, alias="best")
            saved = None
            if (
                self.checkpointer.should_save(
                    self.step, final=final, improved=self.metrics.last_val_improved
                )
                and self.saves_here
            ):
                path = saved = self.checkpointer.save(self.checkpoint_state(), self.step)
                self.wandb.log_checkpoint(path, self.step)
            if not final and self._stop_requested(signals):
                self.stopped_by = signals.received or "a signal on another process"
                if saved is None and self.saves_here:
                    saved = self.checkpointer.save(self.checkpoint_state(), self.step)
                    self.wandb.log_checkpoint(saved, self.step)
                if self.is_main:
                    if bar is not None:
                        bar.close()
                    self._say(
                        f"{self.stopped_by}: stopped after step {self.step}, saved {saved}; "
                        f"continue with --{PATH.checkpointer.resume_from} {ResumeFrom.LATEST}"
                    )
                break
        if last_eval is None and self.step == max_iters and max_iters == 0:
            self._record_eval(self.evaluate())

    def sample(self) -> str | None:
        """Print a generation from the trained model (the `sample` section) and save it as
        <out_dir>/sample.txt (the main process; when sharded, every process runs the forwards)."""
        from runtime.models.deepseek_v3.generation import complete, decode

        settings = self.cfg.sample
        if self.codec is not None:
            prompt = self.codec.encode(settings.prompt)
        else:  # a pre-tokenized corpus: the first tokens of the validation split
            start = self.data.val_set.start
            prompt = [int(t) for t in self.data.corpus.array()[start : start + 4]]
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        ids = complete(self.model, prompt, settings, generator)
        if not self.is_main:
            return None
        text = decode(self.codec, ids)
        with open(os.path.join(self.out_dir, SAMPLE_NAME), "w") as f:
            f.write(text + "\n")
        # escaped control characters: a stray \r from the model would tear a piped log
        shown = "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)
        print(f"--- sample ---\n{shown}\n--------------", flush=True)
        return text


USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    NonFiniteLossError,
    WandbUnavailable,
    dist_utils.SystemConfigError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m runtime train CONFIG [--section.field VALUE ...]`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from generated.parser import SPEC, build_arg_parser

    positionals, argv, wants_help = SPEC.split_command_line(argv)  # flags before or after CONFIG
    if wants_help:
        build_arg_parser().print_help()
        return console.EXIT_OK
    if len(positionals) > 1:
        console.error("train", f"one config file at most, got {' '.join(positionals)}")
        return console.EXIT_USAGE
    path = positionals[0] if positionals else None
    trainer: Trainer | None = None
    try:
        resolved = resolve(path, argv=argv)
        trainer = Trainer(resolved.config, resolved)
        return trainer.run()
    except USER_ERRORS as error:
        console.error("train", error)
        return console.EXIT_USAGE if isinstance(error, ConfigError) else console.EXIT_FAILURE
    except OSError as error:  # disk full, unwritable output folder...: one line, no traceback
        where = f" ({error.filename})" if error.filename else ""
        console.error("train", f"{describe_os_error(error)}{where}")
        return console.EXIT_FAILURE
    except KeyboardInterrupt:  # a second SIGINT, or one outside the training loop
        console.error("train", "interrupted")
        return console.EXIT_INTERRUPTED
    finally:
        logs.close()
        trainer = None  # its sharded state goes before the process groups (dist_utils.shutdown)
        dist_utils.shutdown()
