"""The checkpoint manager: the `checkpointer` section's policy over the run's Stateful components.

It is built once, from the components (name -> object with state_dict / load_state_dict), and
decides the format itself: single files written by the main process (one process, DDP), or DCP
folders written by every process together (a model sharded by FSDP2 / expert parallelism).
Saving: every `save_interval` steps when the last validation improved (or always, with
`always_save_checkpoint`), at the end of the run, and the best one apart when `save_best`; only the
newest `keep_last_n` step checkpoints are kept.

Resuming (`find_resume`, before the model exists): a path named by `resume_from` must load;
`latest` takes the newest step checkpoint that loads (checksums, weights-only unpickling, config
hash, step) and belongs to the folder's run, warning about each newer one it skips. Under a
process group all processes decide together and take the same checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist

from generated import PATH
from generated.config import CheckpointerConfig
from generated.names import ResumeFrom
from runtime.checkpoint.dcp import ShardedWriter, load_full_into, load_into, load_meta, verify
from runtime.checkpoint.format import (
    CheckpointError,
    checkpoint_dict,
    load_components,
    step_checkpoints,
)
from runtime.checkpoint.single_file import FileWriter, load_checkpoint, verify_checksum
from runtime.utils.files import describe_os_error


def read_checkpoint(path: str, rank: int = 0, verified: bool = False) -> dict[str, Any]:
    """The checkpoint at `path` without loading it anywhere: a file's whole dict, or a sharded
    folder's metadata with `sharded` (the folder) and `rng` (process `rank`'s) added; checksums
    (unless `verified`) and the config hash checked."""
    if os.path.isdir(path):
        return load_meta(path, rank, verified=verified)
    return load_checkpoint(path, verified=verified)


def _world() -> tuple[int, int]:
    """(this process's rank, processes) of the run's process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agreed(problem: str | None) -> str | None:
    """Every process's verdict on the same question, gathered: the first problem (naming its
    process when there are several), the same on all, or None."""
    rank, world = _world()
    if world == 1:
        return problem
    verdicts: list[str | None] = [None] * world
    dist.all_gather_object(verdicts, problem)
    return next((f"{v} (rank {r})" for r, v in enumerate(verdicts) if v is not None), None)


def _verify(path: str) -> str | None:
    """Whether `path` is intact, every process hashing its share of a sharded folder's files,
    process 0 alone a single file's (the others load it as verified); the verdict is all of
    theirs."""
    rank, world = _world()
    try:
        if os.path.isdir(path):
            verify(path, rank, world)
        elif rank == 0:
            verify_checksum(path)
    except CheckpointError as error:
        return _agreed(str(error))
    return _agreed(None)


def _read(path: str, step: int | None, run_id: str | None) -> tuple[str | None, dict[str, Any]]:
    """(problem or None, state) of a verified checkpoint, the problem agreed by all processes."""
    rank, _ = _world()
    state: dict[str, Any] = {}
    try:
        state = read_checkpoint(path, rank, verified=True)
        if step is not None and int(state["step"]) != step:
            raise CheckpointError(f"checkpoint {path}: holds step {state['step']}, not {step}")
        owner = state.get("run_id")
        if run_id is not None and owner is not None and owner != run_id:
            raise CheckpointError(
                f"checkpoint {path}: belongs to run {owner}, not to run {run_id} of this out_dir"
            )
        problem = None
    except CheckpointError as error:
        problem = str(error)
    return _agreed(problem), state


def find_resume(
    checkpointer: CheckpointerConfig,
    run_id: str | None = None,
    warn: Callable[[str], object] | None = None,
) -> tuple[str | None, dict[str, Any] | None]:
    """(path, state) of the checkpoint to resume from, or (None, None) for a fresh run. Under a
    process group every process calls it together and they decide as one: the candidates are
    process 0's, each is verified by all (every process hashing its share; a failed read is
    tried again once), and all take the same one or fail with the same error.

    A path named by `resume_from` must load. `latest` takes the newest step checkpoint that
    loads (checksum, weights-only unpickling, config hash, step) and, when `run_id` (the out_dir's
    run) is given, belongs to that run (checkpoints older than run ids are accepted), calling
    `warn` with the problem of each newer one it skips; if step checkpoints exist but none can
    be used, that is an error rather than a silent fresh start."""
    warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
    target, folder = checkpointer.resume_from, checkpointer.save_dir
    assert folder is not None, "save_dir is a derived default, filled when the config resolves"
    if target is None:
        return None, None
    if target != ResumeFrom.LATEST:
        if not os.path.exists(target):
            raise CheckpointError(f"{PATH.checkpointer.resume_from}: no checkpoint file {target!r}")
        problem = _verify(target)
        if problem is None:
            problem, state = _read(target, None, None)
        if problem is not None:
            raise CheckpointError(problem, all_ranks=_world()[1] > 1)
        return target, state
    candidates = list(reversed(step_checkpoints(folder)))
    if _world()[1] > 1:  # process 0's listing, so that all try the same ones in the same order
        box: list[Any] = [candidates]
        dist.broadcast_object_list(box, src=0)
        candidates = box[0]
    problems: list[str] = []
    for step, path in candidates:
        problem = _verify(path)
        if problem is None:
            problem, state = _read(path, step, run_id)
        if problem is None:
            return path, state
        problems.append(problem)
        warn(f"warning: {problem}; trying an older checkpoint")
    if problems:
        raise CheckpointError(
            f"{PATH.checkpointer.resume_from} {ResumeFrom.LATEST}: none of the {len(problems)} step "
            f"checkpoints in {folder} can be used (newest: {problems[0]})",
            all_ranks=_world()[1] > 1,
        )
    return None, None


def check_writable(folder: str) -> None:
    """CheckpointError now, not after hours of training, if `folder` cannot take files."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointError(
            f"cannot write checkpoints to {folder}: {describe_os_error(error)}"
        ) from None


class CheckpointManager:
    """Saves and loads the union of `components` (name -> Stateful, put `rng` last: loading it
    restores the generators) under the `checkpointer` section's policy. `sharded`: DCP folders,
    every process calling save / save_best together; otherwise single files of process 0."""

    def __init__(
        self,
        checkpointer: CheckpointerConfig,
        components: Mapping[str, Any],
        *,
        rank: int = 0,
        world: int = 1,
        sharded: bool = False,
        saved_names: list[str] | None = None,
    ) -> None:
        assert checkpointer.save_dir is not None, "save_dir is a derived default"
        self.cfg = checkpointer
        self.dir = checkpointer.save_dir
        self.components = dict(components)
        self.sharded, self.rank = sharded, rank
        # the parameter names of the whole model, in order, when this process holds only some
        # (a pipeline stage's): a single-file checkpoint's optimizer state is keyed by index
        self.saved_names = saved_names
        self.writer: FileWriter = (
            ShardedWriter(self.dir, components["model"], components["optimizer"], rank, world)
            if sharded
            else FileWriter(self.dir)
        )
        # a sharded folder takes a part from every process; a single file only the main one's
        self.saves_here = sharded or rank == 0

    @property
    def keep_best(self) -> bool:
        return self.cfg.save_best

    @property
    def best_path(self) -> str:
        return os.path.join(self.dir, self.writer.best_name)

    def should_save(self, step: int, *, final: bool, improved: bool) -> bool:
        """Save after step `step` (steps done)? Every `save_interval` steps, when `improved` (the last
        validation improved on the best so far) or `always_save_checkpoint`; always at the end."""
        if final:
            return True
        interval = self.cfg.save_interval
        if interval <= 0 or step % interval:
            return False
        return self.cfg.always_save_checkpoint or improved

    def state(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """The checkpoint dict of the components now, with `meta` (step, run_id, tokenizer,
        config)."""
        return checkpoint_dict(self.components, meta)

    def save(self, step: int, meta: Mapping[str, Any]) -> str | None:
        """Write the step checkpoint and prune old ones; its path (None on a process that writes
        nothing)."""
        if not self.saves_here:
            return None
        path = os.path.join(self.dir, self.writer.name(step))
        self.writer.write(self.state(meta), path)
        self.prune()
        return path

    def save_best(self, meta: Mapping[str, Any]) -> str | None:
        if not self.saves_here:
            return None
        self.writer.write(self.state(meta), self.best_path)
        return self.best_path

    def prune(self) -> list[str]:
        """Remove step checkpoints beyond the newest `keep_last_n` (0 keeps all); after a sharded
        write every process sees the same folders, and process 0 removes them."""
        keep = self.cfg.keep_last_n
        if keep <= 0 or self.rank != 0:
            return []
        removed: list[str] = []
        for _, path in step_checkpoints(self.dir)[:-keep]:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            removed.append(path)
        return removed

    def remove_stale_temps(self) -> list[str]:
        """Delete what a killed save left behind; returns the paths."""
        return self.writer.remove_stale_temps()

    def load(self, state: Mapping[str, Any], path: str) -> None:
        """Load checkpoint `state` (from find_resume) into the components. A sharded folder, or a
        single file loaded onto a sharded model, puts the weights and optimizer state in place first
        (each process keeps its shards); everything else loads as from a single file."""
        components = self.components
        if state.get("sharded") or self.sharded:
            model, optimizer = components["model"], components["optimizer"]
            if state.get("sharded"):  # resharded onto this layout
                load_into(model, optimizer, state["sharded"])
            else:
                load_full_into(model, optimizer, state, self.saved_names)
            components = {k: v for k, v in components.items() if k not in ("model", "optimizer")}
        load_components(components, state, path)
