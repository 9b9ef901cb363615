"""Megatron-LM's indexed dataset format (`MMIDIDX`, version 1), read and written as it is.

A dataset is a prefix: `PREFIX.bin` holds the tokens of every sequence back to back, `PREFIX.idx`
describes them:

    b"MMIDIDX\\x00\\x00"   header (9 bytes)
    <Q  version (1)
    <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    <Q  sequence count S
    <Q  document count D + 1
    int32[S]    tokens per sequence
    int64[S]    byte offset of each sequence in the .bin
    int64[D+1]  sequence index where each document starts (0 first, S last)

Megatron's preprocessing writes one sequence per document (or per sentence, with
--split-sentences) and, with --append-eod, the end-of-document token after each document; our
`data prepare` writes one sequence per document, its EOS appended. Token dtypes follow Megatron's
choice: uint16 below 65,536 ids, int32 above (Megatron has no uint32).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
    7: np.float32, 8: np.uint16,
}  # fmt: skip
TOKEN_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}  # what we write


class IndexedFormatError(ValueError):
    """A .bin / .idx pair that is not a readable indexed dataset (the message names the file)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else int32 (Megatron's choice)."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def prefix_of(path: str) -> str | None:
    """The prefix of a Megatron dataset named by `path` (the prefix itself, or its .bin / .idx),
    or None when the pair is not there."""
    base = path[: -len(".bin")] if path.endswith((".bin", ".idx")) else path
    if os.path.isfile(base + ".bin") and os.path.isfile(base + ".idx"):
        return base
    return None


@dataclass
class IndexedDataset:
    """A Megatron prefix, memory-mapped: `tokens` (all of the .bin), per sequence `lengths` and
    `pointers` (element offsets into `tokens`), and `doc_starts` (D + 1 token offsets: where each
    document starts in `tokens`, the total last). Reading it costs its index only."""

    prefix: str
    tokens: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray  # (S,) token offset of each sequence
    doc_starts: np.ndarray  # (D + 1,) token offset where each document starts, then the end

    @property
    def n_documents(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.doc_starts[-1]) if len(self.doc_starts) else 0

    @classmethod
    def open(cls, prefix: str) -> IndexedDataset:
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        try:
            with open(idx_path, "rb") as f:
                head = f.read(9 + 8 + 1 + 8 + 8)
            if len(head) < 34 or head[:9] != HEADER:
                raise IndexedFormatError(f"{idx_path}: not a Megatron index (no MMIDIDX header)")
            (version,) = struct.unpack("<Q", head[9:17])
            if version != VERSION:
                raise IndexedFormatError(
                    f"{idx_path}: index version {version}, this reader takes {VERSION}"
                )
            code = head[17]
            if code not in DTYPE_CODES:
                raise IndexedFormatError(f"{idx_path}: unknown dtype code {code}")
            dtype = np.dtype(DTYPE_CODES[code])
            if dtype.kind not in "ui":
                raise IndexedFormatError(f"{idx_path}: tokens of dtype {dtype} are not token ids")
            n_seq, n_doc = struct.unpack("<QQ", head[18:34])
            need = 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
            size = os.path.getsize(idx_path)
            if size < need:
                raise IndexedFormatError(f"{idx_path}: {size} bytes, its header says {need}")
            index = np.memmap(idx_path, dtype=np.uint8, mode="r")
            lengths = index[34 : 34 + n_seq * 4].view(np.int32)
            pointers = index[34 + n_seq * 4 : 34 + n_seq * 12].view(np.int64)
            doc_index = index[34 + n_seq * 12 : need].view(np.int64)
            bin_size = os.path.getsize(bin_path)
            if bin_size % dtype.itemsize:
                raise IndexedFormatError(
                    f"{bin_path}: {bin_size} bytes is no whole number of {dtype} tokens"
                )
            tokens = (
                np.memmap(bin_path, dtype=dtype, mode="r") if bin_size else np.zeros(0, dtype=dtype)
            )
        except OSError as error:
            raise IndexedFormatError(
                f"{prefix}: cannot read the indexed dataset: {error}"
            ) from None
        starts = (np.asarray(pointers) // dtype.itemsize).astype(np.int64)
        if n_seq and (
            int(starts[-1]) + int(lengths[-1]) > len(tokens) or (np.asarray(lengths) < 0).any()
        ):
            raise IndexedFormatError(f"{idx_path}: its sequences run past the end of {bin_path}")
        if (
            n_doc == 0
            or doc_index[0] != 0
            or doc_index[-1] != n_seq
            or (np.diff(doc_index) < 0).any()
        ):
            raise IndexedFormatError(f"{idx_path}: its document index is not 0..{n_seq} ascending")
        # the sequences must lie back to back for documents to be token ranges (Megatron's writer
        # and ours both write them so)
        if n_seq and not (starts[1:] == starts[:-1] + np.asarray(lengths[:-1])).all():
            raise IndexedFormatError(f"{idx_path}: its sequences are not stored back to back")
        seq_end = np.concatenate([starts, [int(starts[-1]) + int(lengths[-1]) if n_seq else 0]])
        doc_starts = seq_end[np.asarray(doc_index)] if n_seq else np.zeros(1, dtype=np.int64)
        return cls(
            prefix, tokens, np.asarray(lengths), starts, np.asarray(doc_starts, dtype=np.int64)
        )


class IndexedWriter:
    """Writes one Megatron prefix: add_document() appends a document's tokens (one sequence);
    close() writes the index. The .bin is written as it goes; the index in memory holds 20 bytes
    per document of this prefix only."""

    def __init__(self, prefix: str, dtype: np.dtype) -> None:
        if np.dtype(dtype) not in TOKEN_CODES:
            raise ValueError(f"token dtype {dtype} (write uint16 or int32)")
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self._bin: BinaryIO = open(prefix + ".bin", "wb")
        self.lengths: list[np.ndarray] = []
        self.n_tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their tokens back to back and the length of each."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.lengths.append(np.asarray(lengths, dtype=np.int32))
        self.n_tokens += int(len(tokens))

    def close(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * self.dtype.itemsize
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(self.prefix + ".idx", "wb") as f:
            f.write(HEADER + struct.pack("<Q", VERSION) + bytes([TOKEN_CODES[self.dtype]]))
            f.write(struct.pack("<QQ", len(lengths), len(doc_index)))
            f.write(lengths.tobytes() + pointers.tobytes() + doc_index.tobytes())
            f.flush()
            os.fsync(f.fileno())
