"""Training data: corpora (cached token files), deterministic resumable window sampling, loaders.

A corpus is one flat token file, memory-mapped. `stdlib` and `text_dir` are bytes (vocab 256),
encoded once into `<data_dir>/<dataset>.bin` (uint8) with a `<dataset>.json` fingerprint next to
it, rebuilt atomically (temporary file + rename) when the sources change. `bin` is a uint16 or uint32
token file (`data.token_dtype`) used in place. With `data.tokenizer: bpe` the bytes go further: a byte-level BPE of
`model.vocab_size` tokens is trained on the training split (the first `train_split` of the bytes)
and the whole text encoded with it, cached as `<dataset>.bpe<V>.tokenizer.json`, `.bin` (uint16)
and `.json` (fingerprint, token count, bytes per validation token), rebuilt when the bytes, the
split or the vocabulary size change. The token split then takes the same fractions of the tokens.

Sampling. Every training window is a pure function of (seed, sample id): its start offset is drawn
from a counter-based generator seeded with (seed, stream, sample id). Optimizer step `s` consumes
the global micro-batches `m = 0 .. gradient_accumulation_steps-1`, micro-batch `m` holds the
sample ids `(s * accum + m) * batch_size + b`; process `r` of `W` takes the contiguous slice of
micro-batches `r * accum/W .. (r+1) * accum/W - 1`. So the data position is just the step: resuming
at step N (`StepBatchSampler(start_step=N)`) gives exactly the batches of the uninterrupted run,
and W processes see the same global batch as one process with the same global settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from generated import PATH
from generated.config import DataConfig
from generated.names import Dataset as DatasetChoice
from generated.names import TokenDtype
from generated.names import Tokenizer as TokenizerKind
from runtime.components.tokenizer import TextCodec
from runtime.utils.files import atomic_write_chunks
from runtime.utils.registry import DATASETS, TOKENIZERS

TRAIN_STREAM = 0
VAL_STREAM = 1
CACHE_VERSION = 1
# Directories skipped when collecting the standard library: installed packages and test suites.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


class DataError(RuntimeError):
    """The configured data cannot be used (missing path, too small for a window, ...)."""


@dataclass(frozen=True)
class Corpus:
    """A flat token file: `np.memmap(path, dtype)` of `length` tokens."""

    name: str
    path: str
    dtype: str  # a numpy dtype name: uint8, uint16 or uint32
    length: int
    is_bytes: bool  # tokens are raw bytes (decode a sample with bytes(ids).decode())
    bytes_per_token: float | None = None  # text bytes per token (bits per byte); None: unknown
    codec: TextCodec | None = field(
        default=None, compare=False
    )  # runtime.components.tokenizer.TextCodec of a bpe corpus

    def array(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", shape=(self.length,))


def load_corpus(data: DataConfig, vocab_size: int | None = None) -> Corpus:
    """The corpus of the `data` section (DataConfig), building its caches if needed; `vocab_size`
    (model.vocab_size) is the size of a `bpe` tokenizer."""
    corpus = DATASETS.get(data.dataset)(data)
    return TOKENIZERS.get(data.tokenizer)(corpus, data, vocab_size)


@TOKENIZERS.register(TokenizerKind.BYTES)
def _bytes_tokens(corpus: Corpus, data: DataConfig, vocab_size: int | None) -> Corpus:
    return corpus  # byte corpora are bytes already; a `bin` corpus is its own tokens


def _text_chunks(raw: np.ndarray, start: int, end: int, size: int = 1 << 20) -> Iterator[str]:
    """The bytes raw[start:end] as strings of about `size` bytes, cut after a newline."""
    a = start
    while a < end:
        b = min(end, a + size)
        if b < end:
            newline = bytes(raw[b : min(end, b + 65536)]).find(b"\n")
            b = b + newline + 1 if newline >= 0 else b
        yield bytes(raw[a:b]).decode("utf-8", errors="replace")
        a = b


@TOKENIZERS.register(TokenizerKind.BPE)
def bpe_corpus(byte_corpus: Corpus, data: DataConfig, vocab_size: int | None) -> Corpus:
    """The byte corpus encoded with a byte-level BPE trained on its training split (cached)."""
    # the spec's rules keep `bin` corpora and vocabularies outside [256, 65536] away from here
    assert byte_corpus.is_bytes and vocab_size is not None and 256 <= vocab_size <= 65536
    stem = os.path.join(data.data_dir, f"{byte_corpus.name}.bpe{vocab_size}")
    bin_path, meta_path, tok_path = stem + ".bin", stem + ".json", stem + ".tokenizer.json"
    with open(os.path.join(data.data_dir, f"{byte_corpus.name}.json")) as f:
        source = json.load(f)
    meta = {
        "version": CACHE_VERSION, "source_fingerprint": source["fingerprint"], "source_bytes": byte_corpus.length,
        "train_split": data.train_split, "val_split": data.val_split, "vocab_size": vocab_size,
    }  # fmt: skip
    if all(os.path.exists(p) for p in (bin_path, meta_path, tok_path)):
        with open(meta_path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in meta} == meta and old.get("tokens", -1) * 2 == os.path.getsize(
            bin_path
        ):
            with open(tok_path, encoding="utf-8") as f:
                codec = TextCodec.from_json(TokenizerKind.BPE, f.read())
            return Corpus(
                byte_corpus.name,
                bin_path,
                str(TokenDtype.UINT16),
                old["tokens"],
                False,
                old["bytes_per_token"],
                codec,
            )
    raw = byte_corpus.array()
    train_end = int(byte_corpus.length * data.train_split)
    codec = TextCodec.train_bpe(_text_chunks(raw, 0, train_end), vocab_size)
    pieces = codec.encode_batch(list(_text_chunks(raw, 0, byte_corpus.length)))
    ids = np.concatenate([np.asarray(p, dtype=np.uint16) for p in pieces])
    _, (val_start, val_end) = split_ranges(len(ids), data)
    bytes_per_token = float(
        codec.token_bytes()[ids[val_start:val_end]].sum() / max(1, val_end - val_start)
    )
    atomic_write_chunks(bin_path, [ids.tobytes()])
    atomic_write_chunks(tok_path, [codec.to_json().encode()])
    meta.update(tokens=int(len(ids)), bytes_per_token=bytes_per_token)
    atomic_write_chunks(meta_path, [json.dumps(meta, indent=1).encode()])
    return Corpus(
        byte_corpus.name,
        bin_path,
        str(TokenDtype.UINT16),
        int(len(ids)),
        False,
        bytes_per_token,
        codec,
    )


# ---------------------------------------------------------------------------------------------
# Corpus builders


def _stdlib_files() -> tuple[str, list[str]]:
    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                files.append(os.path.relpath(os.path.join(dirpath, name), root))
    return root, sorted(files)


def _text_files(folder: str) -> list[str]:
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                files.append(os.path.relpath(os.path.join(dirpath, name), folder))
    return sorted(files)


def _is_text(raw: bytes) -> bool:
    if b"\x00" in raw:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _fingerprint(root: str, files: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for rel in files:
        stat = os.stat(os.path.join(root, rel))
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cached_bytes_corpus(
    name: str, data_dir: str, root: str, files: list[str], select_text: bool
) -> Corpus:
    """Concatenate `files` (relative to `root`, in order) into `<data_dir>/<name>.bin`, reusing
    the cache when its fingerprint matches."""
    bin_path = os.path.join(data_dir, f"{name}.bin")
    meta_path = os.path.join(data_dir, f"{name}.json")
    meta: dict[str, Any] = {
        "version": CACHE_VERSION,
        "source": root,
        "files": len(files),
        "fingerprint": _fingerprint(root, files),
    }
    if os.path.exists(bin_path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in meta} == meta and old.get("bytes") == os.path.getsize(bin_path):
            return Corpus(name, bin_path, "uint8", old["bytes"], True, 1.0)

    def chunks() -> Iterator[bytes]:
        for rel in files:
            with open(os.path.join(root, rel), "rb") as f:
                raw = f.read()
            if not select_text or _is_text(raw):
                yield raw

    atomic_write_chunks(bin_path, chunks())
    meta["bytes"] = os.path.getsize(bin_path)
    atomic_write_chunks(meta_path, [json.dumps(meta, indent=1).encode()])
    if meta["bytes"] == 0:
        raise DataError(f"dataset {name!r}: no text found under {root}")
    return Corpus(name, bin_path, "uint8", meta["bytes"], True, 1.0)


@DATASETS.register(DatasetChoice.STDLIB)
def stdlib_corpus(data: DataConfig) -> Corpus:
    """The running Python's standard-library `*.py` files (sorted relative paths; site-packages
    and test directories excluded), as bytes."""
    root, files = _stdlib_files()
    return _cached_bytes_corpus(DatasetChoice.STDLIB, data.data_dir, root, files, select_text=False)


@DATASETS.register(DatasetChoice.TEXT_DIR)
def text_dir_corpus(data: DataConfig) -> Corpus:
    """Every text file (valid UTF-8 without NUL bytes; hidden entries skipped) under `path`,
    in sorted relative-path order, as bytes."""
    if data.path is None or not os.path.isdir(data.path):
        raise DataError(
            f"{PATH.data.path} must be an existing folder for the {DatasetChoice.TEXT_DIR} dataset, got {data.path!r}"
        )
    root = os.path.realpath(data.path)
    return _cached_bytes_corpus(
        DatasetChoice.TEXT_DIR, data.data_dir, root, _text_files(root), select_text=True
    )


@DATASETS.register(DatasetChoice.BIN)
def bin_corpus(data: DataConfig) -> Corpus:
    """A pre-tokenized token file at `path` (`data.token_dtype`: uint16 or uint32, little-endian),
    memory-mapped in place."""
    if data.path is None or not os.path.isfile(data.path):
        raise DataError(
            f"{PATH.data.path} must be an existing .bin file for the {DatasetChoice.BIN} dataset, got {data.path!r}"
        )
    dtype = np.dtype(
        str(data.token_dtype)
    )  # the spec's choices are numpy names (native = little-endian here)
    size = os.path.getsize(data.path)
    if size % dtype.itemsize:
        raise DataError(
            f"{data.path}: a {data.token_dtype} token file ({PATH.data.token_dtype}) must have a size "
            f"divisible by {dtype.itemsize}, found {size} bytes"
        )
    return Corpus(
        DatasetChoice.BIN, os.path.realpath(data.path), dtype.name, size // dtype.itemsize, False
    )


DATASETS.complete()
TOKENIZERS.complete()


# ---------------------------------------------------------------------------------------------
# Splits, windows, sampling


def split_ranges(length: int, data: DataConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train_start, train_end), (val_start, val_end): `train_split` from the start of the corpus,
    `val_split` from its end."""
    train_end = int(length * data.train_split)
    val_start = length - int(length * data.val_split)
    return (0, train_end), (val_start, length)


class WindowDataset(Dataset):
    """Windows of `window` tokens from `corpus[start:end]`; item `i` starts at an offset drawn
    from a generator seeded with (seed, stream, i). Returns int64 tensors of shape (window,)."""

    def __init__(
        self, corpus: Corpus, start: int, end: int, window: int, seed: int, stream: int
    ) -> None:
        if end - start < window:
            raise DataError(
                f"{'train' if stream == TRAIN_STREAM else 'validation'} split of the {corpus.name!r} corpus has "
                f"{end - start} tokens, fewer than one window of {window}"
            )
        self.corpus, self.start, self.end, self.window = corpus, start, end, window
        self.seed, self.stream = seed, stream
        self._data: np.memmap | None = None

    def __len__(self) -> int:
        return self.end - self.start - self.window + 1

    def offset(self, index: int) -> int:
        rng = np.random.default_rng([self.seed, self.stream, int(index)])
        return self.start + int(rng.integers(0, len(self)))

    def __getitem__(self, index: int) -> Tensor:
        if self._data is None:
            self._data = self.corpus.array()
        begin = self.offset(index)
        return torch.from_numpy(self._data[begin : begin + self.window].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:  # memmaps are reopened in worker processes
        state = dict(self.__dict__)
        state["_data"] = None
        return state


def micro_batches_per_rank(grad_accum: int, world_size: int) -> int:
    """Micro-batches each of `world_size` processes runs per optimizer step."""
    if grad_accum % world_size:
        raise DataError(
            f"{PATH.training.gradient_accumulation_steps} ({grad_accum}) must divide by the number of "
            f"processes ({world_size})"
        )
    return grad_accum // world_size


class StepBatchSampler(Sampler):
    """Yields this process's micro-batches (lists of sample ids) for steps start_step..end_step-1.

    Its whole state is `start_step`: resuming builds a new sampler at the resumed step."""

    def __init__(
        self,
        *,
        batch_size: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        start_step: int,
        end_step: int,
    ) -> None:
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.micro_per_rank = micro_batches_per_rank(grad_accum, world_size)
        self.rank, self.start_step, self.end_step = rank, start_step, end_step

    def micro_batch_ids(self, step: int, micro: int) -> list[int]:
        """Sample ids of this rank's `micro`-th micro-batch of optimizer step `step`."""
        global_micro = step * self.grad_accum + self.rank * self.micro_per_rank + micro
        first = global_micro * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            for micro in range(self.micro_per_rank):
                yield self.micro_batch_ids(step, micro)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.micro_per_rank


class EvalBatchSampler(Sampler):
    """The fixed validation batches: batch `i` (of `eval_iters`) holds sample ids
    i*batch_size .. (i+1)*batch_size-1; process `r` of `W` takes batches r, r+W, ... Its first
    `counted` batches are its share of the loss. With `even=True` every process gets the same number
    of batches (a sharded model runs collectives in each forward, so every process must run as many):
    a process with one batch fewer repeats batch 0 after its own, and that repeat is not counted."""

    def __init__(
        self, *, batch_size: int, eval_iters: int, world_size: int, rank: int, even: bool = False
    ) -> None:
        self.batch_size, self.eval_iters, self.world_size, self.rank = (
            batch_size,
            eval_iters,
            world_size,
            rank,
        )
        self.counted = len(range(rank, eval_iters, world_size))
        self.total = -(-eval_iters // world_size) if even else self.counted

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.rank, self.eval_iters, self.world_size):
            yield list(range(i * self.batch_size, (i + 1) * self.batch_size))
        for _ in range(self.total - self.counted):
            yield list(range(self.batch_size))

    def __len__(self) -> int:
        return self.total


class DataModule:
    """The corpus, its splits and loaders for one process.

    data: DataConfig; window: tokens per sample (seq_len + 1 + mtp_depth)."""

    def __init__(
        self,
        data: DataConfig,
        *,
        seed: int,
        window: int,
        batch_size: int,
        grad_accum: int,
        world_size: int = 1,
        rank: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        self.data = data
        self.corpus = load_corpus(data, vocab_size)
        # tokens of this dtype: a bin file's declared one, or the cache's own (uint8 bytes, uint16 BPE)
        declared = data.token_dtype
        self.token_dtype = declared if data.dataset == DatasetChoice.BIN else self.corpus.dtype
        (train_start, train_end), (val_start, val_end) = split_ranges(self.corpus.length, data)
        self.train_set = WindowDataset(
            self.corpus, train_start, train_end, window, seed, TRAIN_STREAM
        )
        self.val_set = WindowDataset(self.corpus, val_start, val_end, window, seed, VAL_STREAM)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.num_workers, self.pin_memory = data.num_workers, data.pin_memory
        self.micro_per_rank = micro_batches_per_rank(grad_accum, world_size)
        self.next_step = 0  # the data position: the next optimizer step's batches come next

    def _loader(
        self, dataset: WindowDataset, batch_sampler: Sampler[list[int]]
    ) -> DataLoader[Tensor]:
        # Windows depend only on their sample ids; the loader's own generator keeps it from drawing
        # its base seed from (and so shifting) the global torch RNG.
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(0),
        )

    def train_loader(self, start_step: int, end_step: int) -> DataLoader[Tensor]:
        """Micro-batches (B, window) of steps start_step..end_step-1, `micro_per_rank` per step."""
        sampler = StepBatchSampler(
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            world_size=self.world_size,
            rank=self.rank,
            start_step=start_step,
            end_step=end_step,
        )
        return self._loader(self.train_set, sampler)

    def val_loader(self, eval_iters: int, even: bool = False) -> DataLoader[Tensor]:
        """This process's validation batches; the first `loader.batch_sampler.counted` count
        (EvalBatchSampler: `even` pads every process to the same number of forwards)."""
        sampler = EvalBatchSampler(
            batch_size=self.batch_size,
            eval_iters=eval_iters,
            world_size=self.world_size,
            rank=self.rank,
            even=even,
        )
        return self._loader(self.val_set, sampler)

    def train_steps(self, end_step: int) -> Iterator[list[Tensor]]:
        """This process's micro-batches (a list of `micro_per_rank`) of each optimizer step from
        next_step to end_step - 1; next_step advances as each step's batches are handed out."""
        loader = iter(self.train_loader(self.next_step, end_step))
        while self.next_step < end_step:
            micro = [next(loader) for _ in range(self.micro_per_rank)]
            self.next_step += 1
            yield micro

    # Stateful: the data position is the next step (windows are a function of the step)
    def state_dict(self) -> dict[str, int]:
        return {"next_step": int(self.next_step)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.next_step = int(state["next_step"])
