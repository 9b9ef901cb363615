"""The checkpoint manager: the `checkpointer` section's policy over the run's Stateful components.

It is built once, from the components (name -> object with state_dict / load_state_dict), and
decides the format itself: single files written by the main process (one process, DDP), or DCP
folders written by every process together (a model sharded by FSDP2 / expert parallelism).
Saving: every `save_interval` steps when the last validation improved (or always, with
`always_save_checkpoint`), at the end of the run, and the best one apart when `save_best`; only the
newest `keep_last_n` step checkpoints are kept.

Resuming (`find_resume`, before the model exists): a path named by `resume_from` must load;
`latest` takes the newest step checkpoint that loads (checksums, weights-only unpickling, config
hash, step) and belongs to the folder's run, warning about each newer one it skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from generated import PATH
from generated.config import CheckpointerConfig
from generated.names import ResumeFrom
from runtime.checkpoint.dcp import ShardedWriter, load_full_into, load_into, load_meta
from runtime.checkpoint.format import (
    CheckpointError,
    checkpoint_dict,
    load_components,
    step_checkpoints,
)
from runtime.checkpoint.single_file import FileWriter, load_checkpoint
from runtime.utils.files import describe_os_error


def read_checkpoint(path: str, rank: int = 0) -> dict[str, Any]:
    """The checkpoint at `path` without loading it anywhere: a file's whole dict, or a sharded
    folder's metadata with `sharded` (the folder) and `rng` (process `rank`'s) added; checksums
    and the config hash verified."""
    if os.path.isdir(path):
        return load_meta(path, rank)
    return load_checkpoint(path)


def find_resume(
    checkpointer: CheckpointerConfig,
    run_id: str | None = None,
    warn: Callable[[str], object] | None = None,
    rank: int = 0,
) -> tuple[str | None, dict[str, Any] | None]:
    """(path, state) of the checkpoint to resume from, or (None, None) for a fresh run.

    A file named by `resume_from` must load. `latest` takes the newest step checkpoint that
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
        return target, read_checkpoint(target, rank)
    problems: list[str] = []
    for step, path in reversed(step_checkpoints(folder)):
        try:
            state = read_checkpoint(path, rank)
            if int(state["step"]) != step:
                raise CheckpointError(f"checkpoint {path}: holds step {state['step']}, not {step}")
            owner = state.get("run_id")
            if run_id is not None and owner is not None and owner != run_id:
                raise CheckpointError(
                    f"checkpoint {path}: belongs to run {owner}, not to run {run_id} of this out_dir"
                )
        except CheckpointError as error:
            problems.append(str(error))
            warn(f"warning: {error}; trying an older checkpoint")
            continue
        return path, state
    if problems:
        raise CheckpointError(
            f"{PATH.checkpointer.resume_from} {ResumeFrom.LATEST}: none of the {len(problems)} step "
            f"checkpoints in {folder} can be used (newest: {problems[0]})"
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
    ) -> None:
        assert checkpointer.save_dir is not None, "save_dir is a derived default"
        self.cfg = checkpointer
        self.dir = checkpointer.save_dir
        self.components = dict(components)
        self.sharded, self.rank = sharded, rank
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
                load_full_into(model, optimizer, state)
            components = {k: v for k, v in components.items() if k not in ("model", "optimizer")}
        load_components(components, state, path)
