"""The `dataset` corpora (used when `data.sources` is empty): one flat token stream each, windows
at offsets drawn per sample.

A corpus is one flat token file, memory-mapped. `stdlib` and `text_dir` are bytes (vocab 256),
encoded once into `<data_dir>/<dataset>.bin` (uint8) with a `<dataset>.json` fingerprint next to
it, rebuilt atomically (temporary file + rename) when the sources change. `bin` is a uint16 or uint32
token file (`data.token_dtype`) used in place. With `data.tokenizer: bpe` the bytes go further: a byte-level BPE of
`model.vocab_size` tokens is trained on the training split (the first `train_split` of the bytes)
and the whole text encoded with it, cached as `<dataset>.bpe<V>.tokenizer.json`, `.bin` (uint16)
and `.json` (fingerprint, token count, bytes per validation token), rebuilt when the bytes, the
split or the vocabulary size change. The token split then takes the same fractions of the tokens.

A `bin` file or a byte corpus may also name a released tokenizer (`data.tokenizer`: a path): the
bytes are then encoded with it (cached by the tokenizer's digest), and a `bin` file's tokens are
taken to be its ids. Sampling: item `i` of a split starts at an offset drawn from a generator
seeded with (seed, stream, i); which sample ids a step reads is sampling.py's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from generated import PATH
from generated.config import DataConfig
from generated.names import Dataset as DatasetChoice
from generated.names import TokenDtype
from generated.names import Tokenizer as TokenizerKind
from runtime.components.data.errors import DataError
from runtime.components.tokenizer import TextCodec, TokenizerError
from runtime.utils.files import atomic_write_chunks
from runtime.utils.registry import DATASETS

# files of records (JSON lines, parquet) that `data prepare` reads and text_dir must not
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".parquet")
TRAIN_STREAM = 0
VAL_STREAM = 1
CACHE_VERSION = 1
# Directories skipped when collecting the standard library: installed packages and test suites.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


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
    (model.vocab_size) is the size of a `bpe` tokenizer and the bound every id is checked
    against. `data.tokenizer`: `bytes` keeps byte corpora as they are, `bpe` trains one on them,
    a path encodes them with that tokenizer; a `bin` file is tokens already (with a path, the
    tokenizer that made them, for the sample and export)."""
    corpus = DATASETS.get(data.dataset)(data)
    if data.tokenizer == TokenizerKind.BYTES:
        pass
    elif data.tokenizer == TokenizerKind.BPE:
        corpus = bpe_corpus(corpus, data, vocab_size)
    elif data.dataset == DatasetChoice.BIN:
        corpus = dataclasses.replace(corpus, codec=_pretrained(data.tokenizer))
    else:
        corpus = pretrained_corpus(corpus, data, _pretrained(data.tokenizer))
    if data.dataset == DatasetChoice.BIN and vocab_size is not None:
        check_bin_ids(corpus, vocab_size)
    return corpus


def _pretrained(path: str) -> TextCodec:
    try:
        return TextCodec.from_path(path)
    except TokenizerError as error:
        raise DataError(f"{PATH.data.tokenizer}: {error}") from None


def check_bin_ids(corpus: Corpus, vocab_size: int) -> None:
    """DataError naming the file and offset of the first id at or above the vocabulary, checked
    once at load; and one for a uint32 file declared uint16 (every second 16-bit word zero)."""
    tokens = corpus.array()
    chunk = 1 << 24
    for start in range(0, corpus.length, chunk):
        block = tokens[start : start + chunk]
        hits = np.flatnonzero(block >= vocab_size)
        if len(hits):
            at = start + int(hits[0])
            raise DataError(
                f"{corpus.path}: token {at:,} is id {int(tokens[at])}, outside the model's "
                f"vocabulary of {vocab_size:,} ({PATH.model.vocab_size}); is "
                f"{PATH.data.token_dtype} ({corpus.dtype}) the file's?"
            )
    if corpus.dtype == TokenDtype.UINT16 and corpus.length >= 64 and corpus.length % 2 == 0:
        high = tokens[1 : min(corpus.length, 1 << 20) : 2]
        if not high.any() and tokens[0 : min(corpus.length, 1 << 20) : 2].any():
            raise DataError(
                f"{corpus.path}: every second 16-bit word is zero: this looks like a uint32 file "
                f"read as uint16; set {PATH.data.token_dtype}: {TokenDtype.UINT32}"
            )


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


def pretrained_corpus(byte_corpus: Corpus, data: DataConfig, codec: TextCodec) -> Corpus:
    """The byte corpus encoded with a released tokenizer (cached by the tokenizer's digest)."""
    tokenizer_sha = hashlib.sha256(codec.to_json().encode()).hexdigest()
    dtype = np.dtype(np.uint16) if codec.vocab_size <= 65536 else np.dtype(np.uint32)
    stem = os.path.join(data.data_dir, f"{byte_corpus.name}.tok{tokenizer_sha[:12]}")
    bin_path, meta_path = stem + ".bin", stem + ".json"
    with open(os.path.join(data.data_dir, f"{byte_corpus.name}.json")) as f:
        source = json.load(f)
    meta = {"version": CACHE_VERSION, "source_fingerprint": source["fingerprint"],
            "tokenizer_sha256": tokenizer_sha, "dtype": dtype.name}  # fmt: skip
    if os.path.exists(bin_path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in meta} == meta and old.get("tokens", -1) * dtype.itemsize == (
            os.path.getsize(bin_path)
        ):
            return Corpus(byte_corpus.name, bin_path, dtype.name, old["tokens"], False,
                          old["bytes_per_token"], codec)  # fmt: skip
    raw = byte_corpus.array()
    pieces = codec.encode_batch(list(_text_chunks(raw, 0, byte_corpus.length)))
    ids = np.concatenate([np.asarray(p, dtype=dtype) for p in pieces])
    bytes_per_token = byte_corpus.length / max(1, len(ids))
    atomic_write_chunks(bin_path, [ids.tobytes()])
    meta.update(tokens=int(len(ids)), bytes_per_token=bytes_per_token)
    atomic_write_chunks(meta_path, [json.dumps(meta, indent=1).encode()])
    return Corpus(
        byte_corpus.name, bin_path, dtype.name, int(len(ids)), False, bytes_per_token, codec
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

    skipped: list[str] = []

    def chunks() -> Iterator[bytes]:
        for rel in files:
            with open(os.path.join(root, rel), "rb") as f:
                raw = f.read()
            if not select_text or _is_text(raw):
                yield raw
            else:
                skipped.append(rel)

    atomic_write_chunks(bin_path, chunks())
    meta["bytes"] = os.path.getsize(bin_path)
    atomic_write_chunks(meta_path, [json.dumps(meta, indent=1).encode()])
    shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    if meta["bytes"] == 0:
        why = f": skipped {shown} (not UTF-8 text)" if skipped else ": no files"
        raise DataError(f"dataset {str(name)!r}: no text under {root}{why}")
    if skipped:
        warnings.warn(
            f"dataset {str(name)!r}: skipped {shown} under {root}: not UTF-8 text", stacklevel=3
        )
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
    files = _text_files(root)
    records = [f for f in files if f.lower().endswith(RECORD_SUFFIXES)]
    if records:  # their bytes would train as text: JSON escapes, parquet pages
        raise DataError(
            f"{PATH.data.path}: {root} holds record files ({', '.join(records[:3])}"
            f"{' ...' if len(records) > 3 else ''}), which the {DatasetChoice.TEXT_DIR} dataset would "
            f"read as raw bytes; tokenize them with `deepseek-moe data prepare {data.path} --tokenizer "
            f"SRC --out DIR` and train on {PATH.data.sources}"
        )
    return _cached_bytes_corpus(
        DatasetChoice.TEXT_DIR, data.data_dir, root, files, select_text=True
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
