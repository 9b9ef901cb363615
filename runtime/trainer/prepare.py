"""Preparing a run, before any component is built: the config settled with the checkpoint it
resumes (or with init_from's architecture), the resume state, the initial weights and the run
folder.

  * resume: `checkpointer.resume_from` names a checkpoint, or `latest` takes the newest usable one
    of the folder's own run (runtime/checkpoint/manager.py: find_resume); the config is reconciled
    with the one saved in it under the spec's checkpoint policies.
  * init_from (a fresh run): a model source (runtime/interop/sources.py) whose architecture fills
    the model section; a model field the run sets explicitly to another value is a config error.
  * the run folder (main process): claimed for this run before anything is written to it
    (run_folder.py), and train.log opened in it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from generated import PATH, batch_ramp
from generated.config import Config
from generated.names import InitFrom, PipelineSchedule, ResumeFrom, Tokenizer
from generated.parser import (
    ConfigError,
    Problem,
    Resolved,
    Source,
    adopt_values,
    reconcile_with_checkpoint,
)
from runtime.checkpoint.format import CheckpointError
from runtime.checkpoint.manager import find_resume
from runtime.components import logs
from runtime.components.data.errors import DataError
from runtime.components.data.sampling import BatchPlan
from runtime.components.lr_schedule import schedule_warnings
from runtime.components.tokenizer import TOKENIZER_FILE, TextCodec, TokenizerError
from runtime.distributed import utils as dist_utils
from runtime.distributed.pipeline import V_SCHEDULES, micro_batch_problem
from runtime.distributed.utils import DistInfo
from runtime.interop.sources import Source as ModelSource
from runtime.interop.sources import UnknownSource, load_source
from runtime.trainer.run_folder import (
    claim_for_fresh_start,
    new_run_id,
    rank_log_name,
    read_run_id,
    write_run_file,
)


@dataclass
class RunSetup:
    """What a run starts from."""

    config: Config
    notes: list[str] = field(default_factory=list)  # how the config was reconciled
    resume_path: str | None = None  # the checkpoint resumed from
    resume_state: dict[str, Any] | None = None  # its state (a sharded one: metadata only)
    load_weights: Callable[[nn.Module], None] | None = None  # init_from's weights, fresh runs
    run_id: str | None = None  # main process only
    launch: DistInfo = field(default_factory=DistInfo)  # the processes torchrun started
    processes: DistInfo = field(default_factory=DistInfo)  # and their group (enabled if any)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def resumed(self) -> bool:
        return self.resume_state is not None


def prepare_run(resolved: Resolved) -> RunSetup:
    """Settle the processes, the config, the resume state, the initial weights and (main
    process) the run folder. `resolved` (from generated.parser.resolve) says which values were set
    explicitly: the checkpoint policies of the spec use it on resume and for init_from. Under
    torchrun the process group comes first, so that all processes choose the checkpoint they
    resume from together."""
    system = resolved.config.system
    launch = dist_utils.check_launch(system.distributed)
    # what can be checked without the other processes fails before waiting for them: every
    # step's global batch (each stage of a batch-size ramp) in whole micro-batches per process,
    # and the skipped steps
    check_batches(resolved.config, launch.world_size)
    logs.configure(enabled=launch.is_main)
    device = dist_utils.resolve_device(
        system.device, launch.local_rank, distributed=launch.world_size > 1
    )
    if device.type == "cpu":
        dist_utils.tune_malloc()  # reuse freed blocks: fresh pages are slow to fault in here
    processes = dist_utils.init_distributed(launch, system.distributed, device.type)
    checkpointer, out_dir = resolved.config.checkpointer, resolved.config.out_dir
    if not launch.is_main:  # this process's warnings and errors, in a log of its own
        os.makedirs(out_dir, exist_ok=True)
        logs.add_file(os.path.join(out_dir, rank_log_name(launch.rank)), logging.WARNING)
    folder_run = read_run_id(out_dir) if checkpointer.resume_from == ResumeFrom.LATEST else None
    path, state = find_resume(checkpointer, run_id=folder_run, warn=logs.log.warning)
    if state is not None:
        assert path is not None  # find_resume returns a state with its path
        resolved, notes = reconcile_with_checkpoint(resolved, state["config"], path)
        setup = RunSetup(resolved.config, notes, path, state)
    else:
        resolved, load_weights = init_from(resolved)
        setup = RunSetup(resolved.config, load_weights=load_weights)
    setup.launch, setup.processes, setup.device = launch, processes, device
    is_main = launch.is_main
    cfg = setup.config
    if is_main:
        setup.run_id = claim_run_folder(cfg, setup)
    if not cfg.evaluator.eval_only:
        for text in schedule_warnings(cfg.schedule, cfg.training.max_iters):
            logs.log.warning(f"warning: {text}")
    return setup


def check_batches(cfg: Config, world_size: int) -> None:
    """DataError unless every step's global batch splits into whole micro-batches on each of
    `world_size` processes and data.skip_steps reads well (sampling.py's BatchPlan)."""
    ramp = batch_ramp(cfg)
    assert ramp is not None  # the spec declares the batch schedule
    dist_cfg = cfg.system.distributed
    P = dist_cfg.pipeline_parallel
    data_world = max(1, world_size // P)  # the processes of a pipeline read the same data
    BatchPlan(
        ramp,
        batch_size=cfg.training.batch_size,
        world_size=data_world,
        skip_steps=cfg.data.skip_steps,
    )
    if P == 1:
        return
    v_shaped = PipelineSchedule(dist_cfg.pipeline_schedule) in V_SCHEDULES
    if v_shaped and (dist_cfg.dp_shard > 1 or dist_cfg.expert_parallel > 1):
        raise DataError(  # `plan` estimates such a layout; training it is not wired
            f"{PATH.system.distributed.pipeline_schedule} {dist_cfg.pipeline_schedule} splits the "
            f"backward into input and weight passes, which torch 2.13's pipelining cannot do for "
            f"FSDP2-sharded or expert-parallel weights ({PATH.system.distributed.dp_shard} "
            f"{dist_cfg.dp_shard}, {PATH.system.distributed.expert_parallel} "
            f"{dist_cfg.expert_parallel}); use 1f1b or interleaved_1f1b with them"
        )
    stages = P * (dist_cfg.pipeline_stages_per_rank or 1)
    for stage in ramp.stages:
        n_micro = stage.batch // (cfg.training.batch_size * data_world)
        problem = micro_batch_problem(dist_cfg.pipeline_schedule, n_micro, P, stages)
        if problem:
            raise DataError(
                f"{n_micro} micro-batches per step ({PATH.training.gradient_accumulation_steps} "
                f"or the batch-size ramp, over {data_world} data-parallel processes) cannot run "
                f"the pipeline: {problem}; {PATH.system.distributed.pipeline_schedule} is "
                f"{dist_cfg.pipeline_schedule}"
            )


def init_from(resolved: Resolved) -> tuple[Resolved, Callable[[nn.Module], None] | None]:
    """(resolved config, weight loader or None) for checkpointer.init_from: scratch, or any
    source runtime/interop/sources.py recognises. The source's architecture fills the model
    section; a model field this run sets explicitly to another value is a config error, except
    `model.mtp_depth`: the MTP modules the source has weights for, unless the run says how many
    it trains (0: none; more: the extra ones start fresh). Its tokenizer becomes the run's
    (settle_tokenizer)."""
    path = resolved.config.checkpointer.init_from
    if path == InitFrom.SCRATCH:
        return settle_tokenizer(resolved, None), None
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
    # the MTP modules are the weights' (a folder saved by transformers has none, whatever its
    # config.json says), unless this run sets the depth itself
    fields[PATH.model.mtp_depth] = len(source.mtp_modules_with_weights())
    if resolved.sources[PATH.model.mtp_depth].explicit:
        del fields[PATH.model.mtp_depth]
    resolved = adopt_values(resolved, fields, source.config_file)
    return settle_tokenizer(resolved, source), source.load_weights


def settle_tokenizer(resolved: Resolved, source: ModelSource | None) -> Resolved:
    """The run's tokenizer (`data.tokenizer`) where the config leaves it at its default: the
    init_from source's own (a Hugging Face folder holding tokenizer.json), else the first prepared
    dataset's of `data.sources`. A tokenizer the config names that gives other ids than the
    source's is a config error: the weights would read every token as another."""
    data = resolved.config.data
    where = resolved.sources[PATH.data.tokenizer]
    if not where.explicit:
        found = source.tokenizer_path if source is not None else None
        origin = source.config_file if source is not None else ""
        if found is None:
            prepared = [
                s.path for s in data.sources if os.path.isfile(os.path.join(s.path, TOKENIZER_FILE))
            ]
            found, origin = (prepared[0], prepared[0]) if prepared else (None, "")
        if found is not None:
            return adopt_values(resolved, {PATH.data.tokenizer: found}, origin)
    if source is None or source.tokenizer_path is None or source.tokenizer is None:
        return resolved  # nothing of the source's own to compare with
    theirs = source.tokenizer
    if data.tokenizer == Tokenizer.BPE:
        mine = None  # trained on the corpus later: its ids cannot be the source's
    elif data.tokenizer == Tokenizer.BYTES:
        mine = TextCodec.bytes()
    else:
        try:
            mine = TextCodec.from_path(data.tokenizer)
        except TokenizerError as error:
            raise ConfigError([Problem(PATH.data.tokenizer, str(error), where)]) from None
    if mine is None or not mine.same_ids_as(theirs):
        message = (
            f"{data.tokenizer!r} gives other token ids than the tokenizer of "
            f"{PATH.checkpointer.init_from} {source.path}, so its weights would read every token as "
            f"another; leave {PATH.data.tokenizer} unset (the source's is used) or set it to {source.path}"
        )
        raise ConfigError([Problem(PATH.data.tokenizer, message, where)])
    return resolved


def claim_run_folder(cfg: Config, setup: RunSetup) -> str:
    """The run id, after making sure out_dir holds no other run's files (main process only)."""
    out_dir, state = cfg.out_dir, setup.resume_state
    assert cfg.checkpointer.save_dir is not None  # a derived default, filled when resolved
    folder_run = read_run_id(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if cfg.evaluator.eval_only:  # writes one metrics row, claims nothing
        run_id = (state or {}).get("run_id") or folder_run or new_run_id()
    elif state is not None:
        run_id = state.get("run_id") or folder_run or new_run_id()
        if folder_run is not None and folder_run != run_id and not cfg.overwrite:
            message = (
                f"{out_dir} holds run {folder_run}, but checkpoint {setup.resume_path} is of run "
                f"{run_id}; resume into that run's {PATH.out_dir}, or pass --{PATH.overwrite} true"
            )
            raise ConfigError([Problem(PATH.out_dir, message, Source("file", out_dir, 0), "file")])
        write_run_file(out_dir, run_id)
    else:
        # resume_from latest with no checkpoint yet: the folder's own run starts over
        restart = cfg.checkpointer.resume_from is not None and folder_run is not None
        removed = claim_for_fresh_start(
            out_dir, cfg.checkpointer.save_dir, overwrite=cfg.overwrite, restart_same_run=restart
        )
        run_id = cast(str, folder_run) if restart else new_run_id()  # restart: folder_run set
        write_run_file(out_dir, run_id)
        if removed:
            logs.log.info(f"removed {len(removed)} files of the previous run in {out_dir}")
    logs.add_file(os.path.join(out_dir, logs.LOG_NAME))
    resumed = f", resumed from {setup.resume_path}" if state is not None else ""
    logs.log.info(f"run {run_id} in {out_dir}{resumed}")
    return run_id
