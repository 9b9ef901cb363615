"""Sharded checkpoints through torch.distributed.checkpoint (DCP), for FSDP2 / expert-parallel runs.

A sharded checkpoint is a folder `ckpt_{step:07d}/` (the best one `best/`) holding
  * DCP's files: `__{rank}_0.distcp` (each process writes the shards it owns) and `.metadata`, of
    {"model": ..., "optim": ...} as torch.distributed.checkpoint.state_dict.get_state_dict gives them
    (names without FSDP or checkpoint-wrapper prefixes, DTensors with their global shapes), so DCP
    reshards on load: a checkpoint saved by 2 processes resumes on 1 (no process group) or on 4;
  * `meta.pt`: everything else of a single-file checkpoint (step, config and its hash, best and last
    validation loss, run id, elapsed time, tokenizer, data position), written by rank 0;
  * `rng_rank{r}.pt`: process r's RNG state (a process of a resumed run with no file of its rank,
    i.e. on more processes than saved, takes rank 0's);
  * `checksums.json`: the sha256 of every other file, each process hashing the files it wrote;
  * `COMPLETE`: written last.
Atomicity: everything goes to `.ckpt_{step:07d}.tmp/` first; rank 0 renames it to its final name
only after every process has written and hashed its files (a barrier) and COMPLETE is fsynced. A
killed save leaves only the temporary folder, which `latest` never considers and the next run
removes. Before loading, every file's checksum is verified; a mismatch or a missing file is an
error naming that file (`latest` then falls back to an older checkpoint, as for single files).

Test-only fault injection: the `checkpoint_write` phase of DEEPSEEK_MOE_FAULT (runtime/utils/faults.py)
is reached after a process wrote its shards, only on the ranks listed in DEEPSEEK_MOE_FAULT_RANKS
(comma-separated; all ranks when unset).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from runtime.checkpoint.format import (
    CheckpointError,
    capture_rng_state,
    config_digest,
    nonfinite_message,
    nonfinite_tensors,
)
from runtime.checkpoint.single_file import FileWriter
from runtime.utils.faults import fault_point, read_fault, this_rank_faulty
from runtime.utils.files import atomic_write_bytes, describe_os_error

if TYPE_CHECKING:  # DCP is imported where it is used: it costs train's start 0.75 s
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlanner

SHARDED_DIR = re.compile(r"^ckpt_(\d+)$")
TEMP_DIR = re.compile(r"^\.(ckpt_\d+|best)\.tmp$")
BEST_DIR = "best"
COMPLETE = "COMPLETE"
CHECKSUMS = "checksums.json"
META = "meta.pt"
CHUNK = 1 << 20


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, COMPLETE)) or os.path.exists(os.path.join(path, META))
    )


def sharded_name(step: int) -> str:
    return f"ckpt_{step:07d}"


def _sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha.update(block)
    return sha.hexdigest()


def sha256_retrying(path: str) -> str:
    """The file's sha256, reading it again once if the first read fails (a transient error of a
    network file system must not declare a good checkpoint damaged); OSError if both fail."""
    try:
        read_fault(path)
        return _sha256(path)
    except OSError:
        read_fault(path)
        return _sha256(path)


def _serialized(obj: object) -> bytes:
    # torch.save to bytes: written with atomic_write_bytes, outside the single-file fault points
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rng_name(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def verify(path: str, rank: int = 0, world: int = 1) -> None:
    """CheckpointError naming the file when the folder is incomplete or a file is damaged. Of `world`
    processes, process `rank` hashes every world-th file (the manager gathers their verdicts)."""
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        raise CheckpointError(f"checkpoint {path}: incomplete (no {COMPLETE} marker)")
    try:
        with open(os.path.join(path, CHECKSUMS)) as f:
            sums = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: cannot read {CHECKSUMS}: {error}") from None
    for name, recorded in sorted(sums.items())[rank::world]:
        file = os.path.join(path, name)
        try:
            actual = sha256_retrying(file)
        except OSError as error:
            raise CheckpointError(
                f"checkpoint {path}: shard {file} cannot be read: {describe_os_error(error)}"
            ) from None
        if actual != recorded:
            raise CheckpointError(
                f"checkpoint {path}: shard {file} is damaged (checksum mismatch: "
                f"{actual[:16]}... instead of {recorded[:16]}...)"
            )


def load_meta(path: str, rank: int = 0, verified: bool = False) -> dict[str, Any]:
    """The checkpoint's meta dict (no weights) after verifying every file (unless `verified`: the
    processes of a run verified their shares together), with `sharded` (the folder) and `rng`
    (this rank's RNG state, or rank 0's) added."""
    if not verified:
        verify(path)
    state = torch.load(os.path.join(path, META), map_location="cpu", weights_only=True)
    if state.get("config_sha256") != config_digest(state["config"]):
        raise CheckpointError(
            f"checkpoint {path}: its stored config does not match its recorded hash config_sha256"
        )
    rng_file = os.path.join(path, _rng_name(rank))
    if not os.path.isfile(rng_file):
        rng_file = os.path.join(path, _rng_name(0))
    state["rng"] = torch.load(rng_file, map_location="cpu", weights_only=True)
    state["sharded"] = path
    return state


OLD_PARAM_GROUPS = re.compile(r"optim\.param_groups\.[0-9]+\.")
"""The keys of the optimizer's param groups in folders written before they were saved per
parameter (`optim.param_groups.0.lr`): one list, the same for every process (true of FSDP2 and
EP, not of pipeline stages)."""


def _dcp_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, flat: bool = True
) -> dict[str, Any]:
    """The DCP state of the model and optimizer. `flat`: the optimizer's param-group settings
    saved per parameter name (`optim.param_groups.<name>.lr`), so that processes holding
    different parameters (pipeline stages) each save and find their own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=flat)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optim": optim_sd}


def _saved_flat(path: str) -> bool:
    """Whether the folder holds the param groups per parameter (else as one old list)."""
    keys = _cached_reader(path).read_metadata().state_dict_metadata
    return not any(OLD_PARAM_GROUPS.match(key) for key in keys)


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    """Without a process group DCP loads in this one process, which is what we mean there; it
    would say so in a UserWarning on every load."""
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield


@contextlib.contextmanager
def _reported(message: str) -> Iterator[None]:
    """DCP's failures as one CheckpointError: `message`, then the error's type and first line. DCP
    wraps what each process raised in a CheckpointException, a BaseException: its first failure is
    the one named."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - reported with the path
        cause: BaseException = error
        if isinstance(error, CheckpointException) and error.failures:
            cause = next(iter(error.failures.values()))[0]
        text = str(cause).strip()
        first = text.splitlines()[0] if text else ""
        raise CheckpointError(f"{message}: {type(cause).__name__}: {first}") from None


def load_into(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Load the DCP files of `path` into `model` (FSDP2-sharded or plain) and its optimizer,
    resharding as needed. Without a process group (one process) DCP reads every shard itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    fit = f"checkpoint {path}: its sharded weights or optimizer state do not fit this run"
    with _reported(fit):
        flat = _saved_flat(path)
    state = _dcp_state(model, optimizer, flat)
    with _reported(fit), _one_process_quietly():
        dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(flatten_optimizer_state_dict=flat),
    )


def load_model_into(model: nn.Module, path: str) -> None:
    """Load only the model weights of `path` into `model` (init_from): FSDP2 / expert-parallel
    sharded, each process reads the shards it holds; a plain model in one process reads them all."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    fit = f"checkpoint {path}: its sharded weights do not fit this model"
    with _reported(fit), _one_process_quietly():
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])


def load_full_into(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    saved_names: list[str] | None = None,
) -> None:
    """Load a single-file checkpoint (full tensors, optimizer keyed by parameter index) into a
    sharded model, or the stages of a pipeline: each process keeps what it holds. The optimizer's
    indices follow runtime/components/optimizer.py's build_optimizer (matrices first, then
    vectors, each in parameters() order) over `saved_names`, the parameter names of the model
    that saved it (None: this model's; a pipeline stage's process holds only some)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = [n.replace("_checkpoint_wrapped_module.", "") for n, _ in model.named_parameters()]
    full = saved_names if saved_names is not None else names
    weights = state["model"]
    order = [n for n in full if weights[n].ndim >= 2] + [n for n in full if weights[n].ndim < 2]
    held = set(names)
    saved = state["optimizer"]
    optim: dict[str, Any] = {
        "state": {order[int(i)]: v for i, v in saved["state"].items() if order[int(i)] in held},
        "param_groups": [
            {**g, "params": [order[int(i)] for i in g["params"] if order[int(i)] in held]}
            for g in saved["param_groups"]
        ],
    }
    mine = {k.replace("_checkpoint_wrapped_module.", "") for k in model.state_dict()}
    set_state_dict(
        model,
        optimizer,
        model_state_dict={k: v for k, v in weights.items() if k in mine},
        optim_state_dict=optim,
        options=StateDictOptions(full_state_dict=True),
    )


def load_full(path: str) -> dict[str, Any]:
    """A sharded checkpoint as a single-file checkpoint dict (full model tensors, no optimizer),
    in one process without a process group: for export, sample and init_from."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state = load_meta(path)
    full: dict = {}
    with _reported(f"checkpoint {path}: cannot read its weights"):
        _load_state_dict(
            full,
            storage_reader=FileSystemReader(path),
            planner=_EmptyStateDictLoadPlanner(keys={"model"}),
            no_dist=True,
        )
    state["model"] = full["model"]
    return state


def _box(index: object, shape: tuple[int, ...]) -> tuple[list[int], list[int], list[int]] | None:
    """(offsets, sizes, the dims an integer index drops) of an index of integers and step-1 slices
    over `shape`; None for any other index."""
    parts = index if isinstance(index, tuple) else (index,)
    if len(parts) > len(shape):
        return None
    parts = parts + (slice(None),) * (len(shape) - len(parts))
    offsets, sizes, dropped = [], [], []
    for dim, (part, n) in enumerate(zip(parts, shape)):
        if isinstance(part, int) and -n <= part < n:
            offsets.append(part % n)
            sizes.append(1)
            dropped.append(dim)
        elif isinstance(part, slice) and part.step in (None, 1):
            start, stop, _ = part.indices(n)
            offsets.append(start)
            sizes.append(max(0, stop - start))
        else:
            return None
    return offsets, sizes, dropped


def _box_planner(key: str, offsets: list[int], sizes: list[int]) -> LoadPlanner:
    """A DCP load planner that fills the state dict's one tensor with a box (offsets, sizes) of the
    saved tensor `key`: it plans reads of only the saved chunks the box overlaps, each narrowed to
    the overlap."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class BoxPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            assert self.metadata is not None  # set up by DCP before planning
            saved = self.metadata.state_dict_metadata[key]
            assert isinstance(saved, TensorStorageMetadata), key  # model weights are tensors
            return LoadPlan(create_read_items_for_chunk_list(key, saved, [box]))

        def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
            return self.state_dict[index.fqn]  # the box itself: read items are relative to it

    return BoxPlanner()


def _cached_reader(path: str) -> FileSystemReader:
    """A FileSystemReader of `path` that reads `.metadata` once (export reads thousands of boxes
    from one folder)."""
    from torch.distributed.checkpoint import FileSystemReader

    class CachedReader(FileSystemReader):
        _metadata = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            if self._metadata is None:
                self._metadata = super().read_metadata(*args, **kwargs)
            return self._metadata

    return CachedReader(path)


class _ModelTensor:
    """One model tensor of a sharded folder, for Source.blocks(): `.shape` from the folder's
    metadata; `[index]` reads that block (in this process, without a process group). A box of
    integers and slices reads only the saved chunks it overlaps, so a few experts of a stacked
    expert weight cost those experts plus one saved shard at a time; other indexes read the whole
    tensor."""

    def __init__(
        self, reader: FileSystemReader, name: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        self.reader, self.name, self.shape, self.dtype = reader, name, shape, dtype

    def __getitem__(self, index: Any) -> torch.Tensor:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        box = _box(index, self.shape)
        if box is None:
            return self[()][index]
        offsets, sizes, dropped = box
        out = torch.empty(sizes, dtype=self.dtype)
        if out.numel():
            with _reported(f"checkpoint {self.reader.path}: cannot read {self.name}"):
                _load_state_dict(
                    {"model": {self.name: out}},
                    storage_reader=self.reader,
                    planner=_box_planner("model." + self.name, offsets, sizes),
                    no_dist=True,
                )
        return out.squeeze(dropped) if dropped else out


def model_tensors(path: str) -> dict[str, _ModelTensor]:
    """name -> _ModelTensor for every model weight of the sharded folder `path` (nothing read yet
    but the metadata): export streams them a box at a time."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _cached_reader(path)
    metadata = reader.read_metadata()
    out = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            name = key[len("model.") :]
            out[name] = _ModelTensor(reader, name, tuple(item.size), item.properties.dtype)
    return out


def write_failure(error: BaseException, folder: str) -> str:
    """What stopped a write, in one line: the OS error (ENOSPC, EROFS, EIO) and the folder. DCP
    wraps each process's failure in a CheckpointException (a BaseException), and torch.save's
    archive writer reports a full disk as a bare RuntimeError: the cause is unwrapped, and the
    folder's file system asked when the error names none."""
    from torch.distributed.checkpoint.api import CheckpointException

    cause: BaseException = error
    if isinstance(error, CheckpointException) and error.failures:
        cause = next(iter(error.failures.values()))[0]
    while not isinstance(cause, OSError) and cause.__cause__ is not None:
        cause = cause.__cause__
    where = os.path.dirname(os.path.abspath(folder))
    if isinstance(cause, OSError):
        return f"{describe_os_error(cause)} in {where}"
    try:
        fs = os.statvfs(where)
        full = fs.f_bavail * fs.f_frsize < 4 << 20
        read_only = bool(fs.f_flag & os.ST_RDONLY)
    except OSError:
        full = read_only = False
    code = errno.ENOSPC if full else errno.EROFS if read_only else errno.EIO
    name = errno.errorcode[code]
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"{os.strerror(code)} ({name}) in {where} ({type(cause).__name__}: {first[:200]})"


class ShardedWriter(FileWriter):
    """Writes the checkpoints of `folder` as DCP folders: every process calls write() together
    (collectives inside), each writing the shards it holds of `model` and `optimizer`."""

    def __init__(
        self, folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, world: int
    ) -> None:
        super().__init__(folder)
        self.model, self.optimizer = model, optimizer
        self.rank, self.world = rank, world

    def name(self, step: int) -> str:
        return sharded_name(step)

    @property
    def best_name(self) -> str:
        return BEST_DIR

    def _agree(self, failure: str | None) -> str | None:
        """Every process's verdict gathered: the first failure (naming its rank), the same on
        all, or None."""
        verdicts: list[str | None] = [None] * self.world
        dist.all_gather_object(verdicts, failure)
        return next((f"{v} (rank {r})" for r, v in enumerate(verdicts) if v is not None), None)

    def write(self, state: Mapping[str, Any], path: str) -> None:
        """Every process writes its shards into `.NAME.tmp/` together; the folder takes its name
        only when all did. Non-finite weights or optimizer state on any process, or a write any
        process could not make, refuse the checkpoint on every process alike (one CheckpointError,
        `all_ranks`), the partial folder removed and earlier checkpoints kept."""
        import torch.distributed.checkpoint as dcp

        bad = nonfinite_tensors(state)
        refusal = self._agree(nonfinite_message(bad, path, state.get("step")) if bad else None)
        if refusal is not None:
            raise CheckpointError(refusal, all_ranks=True)
        tmp = os.path.join(self.dir, "." + os.path.basename(path) + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        failure: str | None = None
        sums: dict[str, str] = {}
        try:  # a collective: DCP raises on every process when one failed
            dcp.save(_dcp_state(self.model, self.optimizer), checkpoint_id=tmp)
            rng = os.path.join(tmp, _rng_name(self.rank))
            atomic_write_bytes(rng, _serialized(capture_rng_state()))
            if this_rank_faulty():
                fault_point("checkpoint_write")
            # each process hashes what it wrote: its .distcp shards and its RNG file
            mine = [n for n in os.listdir(tmp) if n.startswith(f"__{self.rank}_")]
            mine.append(_rng_name(self.rank))
            sums = {n: _sha256(os.path.join(tmp, n)) for n in mine}
        except BaseException as error:  # noqa: BLE001 - DCP's CheckpointException is one
            if isinstance(error, KeyboardInterrupt | SystemExit):
                raise
            failure = write_failure(error, tmp)
        failure = self._agree(failure)
        gathered: list[dict[str, str]] = [{} for _ in range(self.world)]
        if failure is None:
            dist.all_gather_object(gathered, sums)
            if self.rank == 0:
                try:
                    self._finish(state, tmp, path, gathered)
                except OSError as error:
                    failure = write_failure(error, tmp)
            box = [failure]
            dist.broadcast_object_list(box, src=0)
            failure = box[0]
        if failure is not None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # the space a full disk needs back
            dist.barrier()
            raise CheckpointError(f"cannot write checkpoint {path}: {failure}", all_ranks=True)
        dist.barrier()

    def _finish(
        self, state: Mapping[str, Any], tmp: str, path: str, gathered: list[dict[str, str]]
    ) -> None:
        """Rank 0: metadata, checksums, COMPLETE, then the rename that makes it a checkpoint."""
        meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}
        meta["sharded_world"] = self.world
        atomic_write_bytes(os.path.join(tmp, META), _serialized(meta))
        total = {k: v for part in gathered for k, v in part.items()}
        for name in (META, ".metadata"):
            total[name] = _sha256(os.path.join(tmp, name))
        atomic_write_bytes(os.path.join(tmp, CHECKSUMS), json.dumps(total, indent=1).encode())
        atomic_write_bytes(os.path.join(tmp, COMPLETE), f"{state['step']}\n".encode())
        old = path + ".old.tmp"
        if os.path.exists(path):  # best/ is replaced: move the old one aside first
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    def remove_stale_temps(self) -> list[str]:
        removed = super().remove_stale_temps()
        if os.path.isdir(self.dir):
            for name in sorted(os.listdir(self.dir)):
                if TEMP_DIR.match(name) or name.endswith(".old.tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        shutil.rmtree(os.path.join(self.dir, name))
                        removed.append(os.path.join(self.dir, name))
        return removed
