"""The Trainer: the run's components assembled from their config sections, and the training loop.

Step numbering: `Trainer.step` counts optimizer steps done. Optimizer step `s` (0-based) uses
lr_at(s) and the loss of step s (runtime/components/loss.py); once it is done the run is at
`iter = s + 1`, which is what metrics.jsonl, evaluations and checkpoint names (`ckpt_{iter:07d}`)
refer to.

Assembly: prepare_run (prepare.py) settles the config, the resume state, the initial weights and
the run folder; the Trainer then builds, in order, the processes and device, the data, the model
(through its family's ModelSpec: runtime/models/build.py), the loss, balancer, optimizer, scaler,
lr schedule, metrics, evaluator and the checkpoint manager (which picks single files or DCP
folders itself), and last loads a resumed checkpoint into all of them.

Faults: SIGTERM / SIGINT stop the run after the current step with a checkpoint (exit 0; a second
signal stops at once, runtime/utils/signals.py); a resumed run truncates metrics.jsonl to its
checkpoint's step. A non-finite loss or gradient norm stops the run or, with
`training.nonfinite_loss: skip`, drops the step.

Per optimizer step, the step's global batch (`training.batch_size` * `gradient_accumulation_steps`
sequences, fewer on a batch-size ramp) is processed as micro-batches of `batch_size` windows across
all processes together (each process runs its share of them, with gradient sync on its last one
only; the data's BatchPlan says which); every micro-loss is divided by this step's per-process
count and DDP / FSDP average over processes, so the update equals the single-process one with the
same settings. `data.skip_steps` moves the data on past skipped batches; the schedules still follow
the optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from generated import PATH, batch_ramp
from generated.config import Config, SampleConfig
from generated.names import NonfiniteLoss, ResumeFrom
from generated.parser import Resolved, dump_yaml, resolved_from_config, to_saved_dict
from runtime.checkpoint.format import RNGState
from runtime.checkpoint.manager import CheckpointManager, check_writable
from runtime.components import logs
from runtime.components.balancer import MoEBalancer
from runtime.components.data.module import DataModule
from runtime.components.data.sampling import span_text
from runtime.components.evaluator import Evaluator
from runtime.components.loss import TrainingLoss
from runtime.components.lr_schedule import LRSchedule
from runtime.components.metrics import MetricsProcessor, MetricsWriter, plot_losses
from runtime.components.optimizer import build_optimizer
from runtime.components.tokenizer import TextCodec, decode
from runtime.components.wandb_logger import WandbLogger
from runtime.distributed import utils as dist_utils
from runtime.distributed import watchdog
from runtime.distributed.compile import compile_module
from runtime.distributed.data_parallel import clip_grad_norm, grad_sync, wrap_ddp
from runtime.distributed.precision import (
    autocast_context,
    autocast_dtype,
    grad_scaler,
    slow_cpu_dtype,
)
from runtime.models import get_model_spec, model_config
from runtime.models.build import build_model
from runtime.trainer.noise import router_noise_rng
from runtime.trainer.pipelined import PipelinedLM, PipelinedSteps
from runtime.trainer.prepare import RunSetup, prepare_run
from runtime.trainer.run_folder import SAMPLE_NAME
from runtime.utils.faults import fault_point
from runtime.utils.signals import StopSignals


def data_module(cfg: Config, world_size: int = 1, rank: int = 0) -> DataModule:
    """The data of process `rank` of `world_size` of a run of `cfg` (what `data replay` reads too)."""
    training = cfg.training
    return DataModule(
        cfg.data,
        seed=cfg.seed,
        window=training.seq_len + 1 + cfg.model.mtp_depth,
        batch_size=training.batch_size,
        grad_accum=training.gradient_accumulation_steps,
        world_size=world_size,
        rank=rank,
        vocab_size=cfg.model.vocab_size,
        stride=training.seq_len,
        ramp=batch_ramp(cfg),
    )


class NonFiniteLossError(RuntimeError):
    """training.nonfinite_loss is `stop` and a step's loss was NaN or infinite."""

    # the loss and the gradient norm are global: every process raises it at the same step, and
    # process 0 alone says so (runtime/cli/console.py)
    all_ranks = True


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from the root `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """The run's components, built from the root Config; `run()` trains and returns an exit code."""

    def __init__(self, run: RunSetup | Config, resolved: Resolved | None = None) -> None:
        """`run`: a prepared run (prepare_run), or a Config to prepare; `resolved` (from
        generated.parser.resolve) then says which values were set explicitly."""
        if not isinstance(run, RunSetup):
            run = prepare_run(resolved if resolved is not None else resolved_from_config(run))
        self.cfg = cfg = run.config
        self.run_id, self.config_notes = run.run_id, run.notes
        self.resumed_from, self.resume_state = run.resume_path, run.resume_state
        self.launch, self.dist, self.device = run.launch, run.processes, run.device
        self.config_dict = to_saved_dict(cfg)
        self.wandb = WandbLogger(
            cfg.wandb,
            out_dir=cfg.out_dir,
            config_dict=self.config_dict,
            is_main=self.launch.is_main,
        )
        self.window = cfg.training.seq_len + 1 + cfg.model.mtp_depth
        # the processes of a pipeline read the same data: their data-parallel rank's
        data_world = max(1, self.launch.world_size // cfg.system.distributed.pipeline_parallel)
        self.data = data_module(cfg, data_world, self.launch.rank % data_world)
        # text <-> tokens for the sample, the checkpoint and export; None for token ids alone
        self.codec: TextCodec | None = self.data.codec
        self._init_processes()
        self.spec = get_model_spec()
        self.model, self.parallel = build_model(
            self.spec, cfg.model, cfg.moe, cfg.system.distributed, self.dist.world_size,
            self.device, run.load_weights, is_main=self.is_main,
            pp_rank=self.launch.rank // data_world,
        )  # fmt: skip
        document_eos = self.data.eos_id if cfg.data.document_mask else None
        self.loss = TrainingLoss(cfg.moe, cfg.mtp, document_eos)
        self.pipelined: PipelinedSteps | None = None
        if self.parallel.layout.pipelined:
            self.pipelined = PipelinedSteps(
                cfg, self.spec, self.model, self.parallel, self.loss, rank=self.dist.rank,
                device=self.device, eos_id=document_eos, autocast=self._autocast,
            )  # fmt: skip
        sum_loads = self.pipelined.sum_loads if self.pipelined is not None else None
        self.balancer = MoEBalancer(self.model, cfg.moe, sum_loads)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scaler = grad_scaler(self.device, self.dtype, self.parallel.sharded)
        self.lr_schedule = LRSchedule(cfg.schedule, cfg.optimizer.lr)
        self.metrics = MetricsWriter(cfg.out_dir, enabled=self.is_main, run_id=self.run_id)
        self.evaluator = Evaluator(
            cfg.evaluator, self.data, self.loss, self.dist, self.device, self._autocast,
            even=self.parallel.sharded,
            main_loss=self.pipelined.main_loss if self.pipelined is not None else None,
        )  # fmt: skip
        self.checkpoints = CheckpointManager(
            cfg.checkpointer, self.components(), rank=self.dist.rank, world=self.dist.world_size,
            sharded=self.parallel.sharded or self.pipelined is not None,
            saved_names=self.pipelined.whole_model_names() if self.pipelined else None,
        )  # fmt: skip
        # a pipeline compiles its stages' blocks itself (PipelinedSteps)
        self.train_module = (
            self.model if self.pipelined else compile_module(self.model, cfg.system.compile)
        )
        if self.dist.enabled and not self.parallel.sharded and self.pipelined is None:
            self.train_module = wrap_ddp(self.train_module, cfg.system.distributed, self.device)
        self.stopped_by: str | None = None  # the signal's name when one ended the run early
        # non-finite steps skipped since the last applied one, and how many may be
        self.skipped_in_a_row, self.max_skipped = 0, cfg.training.max_skipped_steps
        self.watchdog: watchdog.Watchdog | None = None  # while training, with several processes
        self.wandb.start()
        self._write_run_files()
        if self.resume_state is not None:  # last: the RNG after all setup has drawn
            assert self.resumed_from is not None  # set with the state by prepare_run
            self.checkpoints.load(self.resume_state, self.resumed_from)

    # ------------------------------------------------------------------------------------------
    # assembly

    def _init_processes(self) -> None:
        """Precision and seeds (prepare_run set up the device and the processes)."""
        system = self.cfg.system
        self.is_main = self.dist.is_main
        if self.is_main and not self.cfg.evaluator.eval_only:
            assert self.cfg.checkpointer.save_dir is not None  # a derived default
            check_writable(self.cfg.checkpointer.save_dir)
        self.dtype = autocast_dtype(system.device)
        slow = slow_cpu_dtype(self.device, self.dtype, PATH.system.device.dtype)
        if slow and self.is_main:
            warnings.warn(slow, stacklevel=1)
        self.nonfinite_policy = NonfiniteLoss(self.cfg.training.nonfinite_loss)
        seed_everything(self.cfg.seed)
        for note in self.config_notes:
            logs.log.info(f"config: {note}")

    def _write_run_files(self) -> None:
        """config.yaml and the tokenizer (tokenizer.json, tokenizer_config.json: what
        AutoTokenizer reads) in out_dir (main process)."""
        if not self.is_main:
            return
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        with open(os.path.join(self.cfg.out_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(self.cfg))
        if self.codec is not None:
            self.codec.save_hf(self.cfg.out_dir, model_max_length=self.cfg.model.max_seq_len)

    def components(self) -> dict[str, Any]:
        """The run's Stateful parts, by checkpoint key (the RNG last: loading it restores it)."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scaler": self.scaler,  # {} unless float16
            "schedule": self.lr_schedule,
            "data": self.data,
            "balancer": self.balancer,
            "metrics": self.metrics,
            "rng": RNGState(),
        }

    @property
    def step(self) -> int:
        """Optimizer steps done (the schedule's position)."""
        return self.lr_schedule.step

    @step.setter
    def step(self, value: int) -> None:
        self.lr_schedule.step = value

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint holds besides the components."""
        return {
            "step": self.step,
            "run_id": self.run_id,
            "tokenizer": self.codec.state() if self.codec is not None else None,
            "config": self.config_dict,
        }

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        return autocast_context(self.device, self.dtype)

    # ------------------------------------------------------------------------------------------
    # steps

    def train_step(self, step: int, micro_batches: Sequence[torch.Tensor]) -> dict[str, Any]:
        """One optimizer step over this process's micro-batches; returns its metrics (global means)."""
        cfg = self.cfg
        lr = self.lr_schedule.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with router_noise_rng(cfg.moe, cfg.seed, self.dist.rank, step, self.device):
            if self.pipelined is not None:
                metrics = self.pipelined.forward_backward(step, micro_batches)
            else:
                metrics = self._forward_backward(step, micro_batches)
        fault_point("step")
        metrics.update(lr=lr, phase=self.lr_schedule.phase(step))
        if not math.isfinite(metrics["loss"]):
            return self._not_applied(metrics, "loss", metrics["loss"], step)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if cfg.optimizer.grad_clip > 0:
            params = self.model.parameters()
            norm: float | torch.Tensor
            if self.pipelined is not None:  # one norm over every stage
                norm = self.pipelined.clip(cfg.optimizer.grad_clip)
            elif self.parallel.sharded:  # parameters on several meshes
                norm = clip_grad_norm(params, cfg.optimizer.grad_clip, self.dist.world_size)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
            metrics["grad_norm"] = float(norm)
            # an inf/NaN gradient with a finite loss would turn the weights into NaN; with float16
            # the GradScaler skips such steps itself
            if not math.isfinite(metrics["grad_norm"]) and not self.scaler.is_enabled():
                return self._not_applied(metrics, "gradient norm", metrics["grad_norm"], step)
        self.skipped_in_a_row = 0
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

    def _forward_backward(self, step: int, micro_batches: Sequence[torch.Tensor]) -> dict[str, Any]:
        """Forward and backward of this process's micro-batches (gradients synchronised on the
        last one); the step's loss metrics, averaged over every process."""
        n = len(micro_batches)  # this step's: a batch-size ramp grows it
        depth = self.cfg.model.mtp_depth
        sums = torch.zeros(4 + depth, dtype=torch.float64, device=self.device)
        mtp_weight = 0.0
        for j, window in enumerate(micro_batches):
            window = window.to(self.device, non_blocking=True)
            sync = j == n - 1 or not self.dist.enabled  # reduce gradients on the last one
            with grad_sync(self.train_module, sync):
                with self._autocast():
                    out = self.loss(self.train_module, window, step)
                self.scaler.scale(out.loss / n).backward()
            parts = [out.loss, out.main_loss, out.aux_loss, out.z_loss, *out.mtp_losses]
            sums += torch.stack([p.detach().double() for p in parts])
            mtp_weight = out.mtp_weight
        dist_utils.all_reduce_sum(sums, self.dist)
        means = (sums / (n * self.dist.world_size)).tolist()
        return {
            "loss": means[0],
            "main_loss": means[1],
            "aux_loss": means[2],
            "z_loss": means[3],
            **{f"mtp_loss_{k + 1}": means[4 + k] for k in range(depth)},
            "mtp_weight": float(mtp_weight),
        }

    def _not_applied(
        self, metrics: dict[str, Any], what: str, value: float, step: int
    ) -> dict[str, Any]:
        """A step whose loss or gradient norm is not finite: stop (NonFiniteLossError), or with
        the `skip` policy drop its gradients and its routing loads and mark it skipped, up to
        `max_skipped_steps` in a row (every process decides alike: the loss and the norm are
        global)."""
        if self.nonfinite_policy == NonfiniteLoss.STOP:
            raise NonFiniteLossError(
                f"non-finite {what} ({value}) at step {step + 1}; set {PATH.training.nonfinite_loss}: "
                f"{NonfiniteLoss.SKIP} to drop such steps"
            )
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > self.max_skipped:
            raise NonFiniteLossError(
                f"non-finite {what} ({value}) at step {step + 1}, the {self.skipped_in_a_row}th "
                f"step in a row: more than {PATH.training.max_skipped_steps} "
                f"({self.max_skipped}) skipped; the run is not training, so it "
                f"stops (lower {PATH.optimizer.lr}, or resume from an earlier checkpoint)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.balancer.discard()  # a step not applied moves no bias
        metrics["skipped"] = True
        return metrics

    def evaluate(self) -> float:
        """Mean main (next-token) loss over the `eval_iters` fixed validation batches."""
        return self.evaluator.evaluate(self.model, self.step)

    # ------------------------------------------------------------------------------------------
    # the run

    def run(self) -> int:
        self.processor = MetricsProcessor(
            self.metrics,
            self.wandb,
            max_iters=self.cfg.training.max_iters,
            bytes_per_token=self.data.bytes_per_token,
            show_bar=self.is_main and sys.stderr.isatty(),  # a bar in a file: one long line
        )
        try:
            if self.cfg.evaluator.eval_only:
                self.processor.log_eval(self.step, self.evaluate())
            else:
                self._train()
                if self.is_main and self.stopped_by is None:
                    plot_losses(self.cfg.out_dir)
                # a sharded model generates with every process (each forward gathers the weights
                # or sends tokens to the experts' processes); only the main one prints and saves
                sample = self.cfg.sample.max_new_tokens > 0 and self.stopped_by is None
                every_process = self.parallel.sharded or self.pipelined is not None
                if sample and (self.is_main or every_process):
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
            logs.log.info(f"resumed from {self.resumed_from} at step {self.step}")
        if self.is_main:
            for path in self.checkpoints.remove_stale_temps():
                logs.log.info(f"removed {path} (an interrupted checkpoint write)")
        self.resume_state = None  # free the memory
        self.processor.open_bar(self.step)
        timeout = self.cfg.system.distributed.timeout
        self.watchdog = watchdog.start(timeout, self.dist.rank, self.dist.world_size)
        try:
            with StopSignals() as signals:
                self._loop(signals)
        except RuntimeError as error:  # a collective gave up waiting: say for whom
            if not watchdog.collective_gave_up(error):
                raise
            where, failed = f"step {self.step + 1}", watchdog.cause(error)
            raise watchdog.CollectiveTimeout(
                watchdog.diagnose(timeout, self.dist.rank, self.dist.world_size, where, failed)
            ) from None
        finally:
            self.processor.close_bar()
            if self.watchdog is not None:
                self.watchdog.close()

    def _loop(self, signals: StopSignals) -> None:
        max_iters, plan = self.cfg.training.max_iters, self.data.plan
        self.model.train()
        steps = self.data.train_steps(max_iters)
        self.window_tokens, self.window_time = 0, 0.0
        self.first_step, self.loop_start = self.step, time.perf_counter()
        batches = (
            plan.ramp.describe()
            if plan.ramp.ramps
            else f"{plan.global_batch(self.step) * plan.ramp.seq_len:,} tokens per step"
        )
        logs.log.info(f"training steps {self.step + 1}-{max_iters} ({batches})")
        if plan.skips:
            logs.log.info(
                f"{PATH.data.skip_steps}: skipping {plan.skips_text()} (batch N: the one step N "
                f"of a run without skips reads)"
            )
        while self.step < max_iters:
            step = self.step
            skipped = plan.skipped_at(step)
            if skipped:
                logs.log.info(
                    f"step {step + 1}: skipped batch{'es' if len(skipped) > 1 else ''} "
                    f"{span_text(skipped)} ({PATH.data.skip_steps}); it reads batch "
                    f"{plan.position(step) + 1}"
                )
            will_log = (step + 1) % self.cfg.training.log_interval == 0 or step + 1 == max_iters
            if will_log:
                self.balancer.reset_stats()
            start = time.perf_counter()
            metrics = self.train_step(step, next(steps))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._count(time.perf_counter() - start, metrics, will_log)
            self.step = step + 1
            self._progress(f"after step {self.step}")
            saved = self._evaluate_and_save(final=self.step == max_iters)
            if self.step < max_iters and self._stop_requested(signals):
                self._stop(signals, saved)
                break
        if self.step == max_iters == 0:  # nothing to train: still one evaluation
            self.processor.log_eval(self.step, self.evaluate())

    def _progress(self, where: str) -> None:
        """Tell the watchdog (multi-process runs) that this process is still making progress."""
        if self.watchdog is not None:
            self.watchdog.progress(self.step, where)

    def _count(self, seconds: float, metrics: dict[str, Any], will_log: bool) -> None:
        """The step's time and tokens into the throughput window; the bar, and the metrics every
        log_interval steps: with the tokens trained on so far (skipped batches not counted) and
        the step's global batch, which a batch-size ramp grows."""
        plan, max_iters = self.data.plan, self.cfg.training.max_iters
        seq_len = plan.ramp.seq_len
        batch = plan.global_batch(self.step)
        self.window_time += seconds
        self.window_tokens += batch * seq_len
        tokens_per_s = self.window_tokens / max(self.window_time, 1e-9)
        self.processor.step(metrics, tokens_per_s)
        if not will_log:
            return
        done = self.step + 1
        trained = plan.samples_trained(done)
        record = {
            "iter": done,
            **metrics,
            "tokens": trained * seq_len,
            "batch_size": batch,
            "tokens_per_s": tokens_per_s,
            **self.balancer.stats(self.pipelined.gather_rows if self.pipelined else None),
            **self.data.source_stats(done),
        }
        if plan.skipped_batches(done):
            record["skipped_batches"] = plan.skipped_batches(done)
        # the time left by the samples left: later steps of a ramp take longer
        run = trained - plan.samples_trained(self.first_step)
        left = plan.samples_trained(max_iters) - trained
        eta = (time.perf_counter() - self.loop_start) * left / max(run, 1)
        self.processor.log_step(record, eta)
        self.window_tokens, self.window_time = 0, 0.0

    def _evaluate_and_save(self, final: bool) -> str | None:
        """Evaluate every eval_interval steps and at the end (keeping the best checkpoint), then
        save a step checkpoint where the policy says; returns its path, if one was written."""
        if self.step % self.cfg.evaluator.eval_interval == 0 or final:
            self._progress(f"evaluating after step {self.step}")
            improved = self.processor.log_eval(self.step, self.evaluate())
            if improved and self.checkpoints.keep_best:
                path = self.checkpoints.save_best(self.checkpoint_meta())
                if path is not None:
                    self.wandb.log_checkpoint(path, self.step, alias="best")
        improved = self.metrics.last_val_improved
        if not self.checkpoints.should_save(self.step, final=final, improved=improved):
            return None
        self._progress(f"saving the checkpoint of step {self.step}")
        saved = self.checkpoints.save(self.step, self.checkpoint_meta())
        if saved is not None:
            self.wandb.log_checkpoint(saved, self.step)
        return saved

    def _stop_requested(self, signals: StopSignals) -> bool:
        """Whether any process got SIGTERM / SIGINT (all processes agree, so all stop together)."""
        if not self.dist.enabled:
            return signals.received is not None
        flag = torch.tensor([float(signals.received is not None)], device=self.device)
        return bool(dist_utils.all_reduce_sum(flag, self.dist).item() > 0)

    def _stop(self, signals: StopSignals, saved: str | None) -> None:
        """Stop early: save now unless this step just did, and say how to continue."""
        self.stopped_by = signals.received or "a signal on another process"
        if saved is None and self.checkpoints.saves_here:
            saved = self.checkpoints.save(self.step, self.checkpoint_meta())
            if saved is not None:
                self.wandb.log_checkpoint(saved, self.step)
        if self.is_main:
            self.processor.close_bar()
            logs.log.info(
                f"{self.stopped_by}: stopped after step {self.step}, saved {saved}; "
                f"continue with --{PATH.checkpointer.resume_from} {ResumeFrom.LATEST}"
            )

    def sample(self) -> str | None:
        """Print a generation from the trained model (the `sample` section) and save it as
        <out_dir>/sample.txt (the main process; when sharded, every process runs the forwards)."""
        settings = self.cfg.sample
        if self.codec is not None:
            prompt = self.codec.encode(settings.prompt)
        else:  # token ids without a tokenizer: the first tokens of the validation data
            prompt = self.data.prompt_tokens(4)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        if self.pipelined is not None:  # every process of the pipeline, the stages in turn
            was_training = self.model.training
            self.model.eval()
            model: nn.Module = PipelinedLM(self.pipelined)
            ids = complete(self.spec.generate, model, prompt, settings, generator, use_cache=False)
            self.model.train(was_training)
        else:
            ids = complete(self.spec.generate, self.model, prompt, settings, generator)
        if not self.is_main:
            return None
        text = decode(self.codec, ids)
        with open(os.path.join(self.cfg.out_dir, SAMPLE_NAME), "w") as f:
            f.write(text + "\n")
        # escaped control characters: a stray \r from the model would tear a piped log
        shown = "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)
        print(f"--- sample ---\n{shown}\n--------------", flush=True)
        return text


def complete(
    generate: Callable[..., torch.Tensor],
    model: nn.Module,
    prompt: list[int],
    settings: SampleConfig,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """prompt ids and their continuation under `settings` (the `sample` section, SampleConfig), as
    the trainer's end-of-run sample does it: prompt tokens outside the vocabulary are dropped ([0]
    if none is left) and at most max_seq_len - len(prompt) tokens (at least one) are added."""
    cfg = model_config(model)
    prompt = [t for t in prompt if t < cfg.vocab_size] or [0]
    room = max(1, cfg.max_seq_len - len(prompt))
    ids = generate(
        model,
        prompt,
        min(settings.max_new_tokens, room),
        settings.temperature,
        generator,
        top_k=settings.top_k,
        top_p=settings.top_p,
        use_cache=use_cache,
    )
    return ids[0].tolist()
