"""The sources of a mixture (`data.sources`), opened: a prepared dataset folder (prepare.py: shards,
held-out validation shards, the tokenizer, a manifest) or a Megatron-LM prefix (indexed.py), each
with its training and validation parts cut into windows. Imports no torch (`data inspect` and
`data prepare` run without it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from generated import PATH
from runtime.components.data.indexed import IndexedDataset, IndexedFormatError, prefix_of
from runtime.components.data.prepare import MANIFEST
from runtime.components.tokenizer import TOKENIZER_FILE


class SourceError(ValueError):
    """A source that cannot be used (the message names it and what is wrong)."""


@dataclass
class Part:
    """Token ranges of one source cut into windows: `shards` with the [start, end) token range of
    each that belongs to this part (training or validation)."""

    shards: list[IndexedDataset]
    ranges: list[tuple[int, int]]
    window: int = 0
    stride: int = 0
    _first: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))

    @property
    def tokens(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def cut(self, window: int, stride: int) -> int:
        """Cut into windows of `window` tokens every `stride` (within a shard); returns how many."""
        self.window, self.stride = window, stride
        per = [max(0, (end - start - window) // stride + 1) for start, end in self.ranges]
        self._first = np.concatenate([[0], np.cumsum(per)]).astype(np.int64)
        return int(self._first[-1])

    @property
    def n_windows(self) -> int:
        return int(self._first[-1])

    def window_at(self, j: int) -> np.ndarray:
        shard = int(np.searchsorted(self._first, j, side="right")) - 1
        start = self.ranges[shard][0] + (j - int(self._first[shard])) * self.stride
        return self.shards[shard].tokens[start : start + self.window]


@dataclass
class TokenSource:
    """One opened source: where it came from, its training and validation parts, and what it
    knows of its tokenizer."""

    path: str
    kind: str  # "prepared" or "megatron"
    train: Part
    val: Part | None  # None: none of its own (a Megatron prefix before the split, an empty one)
    tokenizer_file: str | None = None  # a prepared folder's tokenizer.json
    tokenizer_sha256: str | None = None
    eos_id: int | None = None
    vocab_size: int | None = None  # what the manifest says its ids stay below
    bytes_per_token: float | None = None
    max_id: int = 0

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path)) or self.path


def _manifest(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise SourceError(f"{path}: cannot read the dataset manifest ({error})") from None
    if manifest.get("format_version") != 1:
        raise SourceError(
            f"{path}: format version {manifest.get('format_version')!r}, this trainer reads 1"
        )
    return manifest


def _whole(shards: list[IndexedDataset]) -> Part:
    return Part(shards, [(0, s.n_tokens) for s in shards])


def open_source(path: str) -> TokenSource:
    """A prepared dataset folder (its manifest.json) or a Megatron prefix; SourceError otherwise."""
    try:
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
            manifest = _manifest(path)

            def shards(part: str) -> list[IndexedDataset]:
                return [IndexedDataset.open(os.path.join(path, s["prefix"]))
                        for s in manifest[part]["shards"]]  # fmt: skip

            val_shards = shards("validation")
            tokenizer = manifest["tokenizer"]
            source = TokenSource(
                path=path,
                kind="prepared",
                train=_whole(shards("train")),
                val=_whole(val_shards) if val_shards else None,
                tokenizer_file=os.path.join(path, TOKENIZER_FILE),
                tokenizer_sha256=tokenizer.get("sha256"),
                eos_id=tokenizer.get("eos_id"),
                vocab_size=tokenizer.get("vocab_size"),
                bytes_per_token=manifest.get("bytes_per_token"),
            )
        elif (prefix := prefix_of(path)) is not None:
            source = TokenSource(path, "megatron", _whole([IndexedDataset.open(prefix)]), None)
        elif os.path.isdir(path):
            raise SourceError(
                f"{path}: a folder without {MANIFEST}: prepare it with `deepseek-moe data prepare`"
            )
        else:
            raise SourceError(
                f"{path}: neither a prepared dataset folder nor a Megatron PREFIX(.bin/.idx)"
            )
    except IndexedFormatError as error:
        raise SourceError(str(error)) from None
    except KeyError as error:
        raise SourceError(f"{os.path.join(path, MANIFEST)}: no {error} entry") from None
    return source


def hold_out_tail(source: TokenSource, fraction: float) -> None:
    """Give a source without validation documents of its own its last whole documents, about
    `fraction` of its tokens (at least one document), as its validation part."""
    if source.val is not None:
        return
    shard = source.train.shards[-1]
    if shard.n_documents < 2:
        raise SourceError(
            f"{source.path}: {shard.n_documents} document(s) in its last shard; holding out whole "
            f"documents for validation needs two (or set {PATH.data.validation})"
        )
    target = shard.n_tokens - max(1, int(source.train.tokens * fraction))
    cut = int(np.searchsorted(shard.doc_starts, target, side="right")) - 1
    cut = min(max(cut, 1), shard.n_documents - 1)  # keep one document on each side
    boundary = int(shard.doc_starts[cut])
    source.train.ranges[-1] = (source.train.ranges[-1][0], boundary)
    source.val = Part([shard], [(boundary, shard.n_tokens)])


def check_ids(source: TokenSource, vocab_size: int, cache_dir: str | None = None) -> None:
    """SourceError naming the file and the offset of the first token id at or above the model's
    vocabulary. A prepared folder's manifest answers it; a Megatron prefix is scanned once (the
    answer is cached in `cache_dir`, keyed by the files' sizes and times)."""
    if source.vocab_size is not None:  # prepare wrote ids of its tokenizer's vocabulary only
        if source.vocab_size > vocab_size:
            raise SourceError(
                f"{source.path}: prepared with a tokenizer of {source.vocab_size:,} ids, but the "
                f"model's vocabulary ({PATH.model.vocab_size}) is {vocab_size:,}"
            )
        return
    for shard in {
        id(s): s for s in source.train.shards + (source.val.shards if source.val else [])
    }.values():
        shard_max = _max_id(shard, cache_dir)
        if shard_max >= vocab_size:
            offset = _first_at_or_above(shard.tokens, vocab_size)
            raise SourceError(
                f"{shard.prefix}.bin: token {offset:,} is id {int(shard.tokens[offset])}, outside the "
                f"model's vocabulary of {vocab_size:,} ({PATH.model.vocab_size})"
            )
        source.max_id = max(source.max_id, shard_max)


CHUNK = 1 << 24


def _max_id(shard: IndexedDataset, cache_dir: str | None) -> int:
    stats = [os.stat(shard.prefix + ext) for ext in (".bin", ".idx")]
    key = hashlib.sha256(
        f"{os.path.abspath(shard.prefix)}|{[(s.st_size, s.st_mtime_ns) for s in stats]}".encode()
    ).hexdigest()[:24]
    cache = os.path.join(cache_dir, f"maxid-{key}.json") if cache_dir else None
    if cache and os.path.isfile(cache):
        with open(cache) as f:
            return int(json.load(f)["max_id"])
    top = 0
    for start in range(0, len(shard.tokens), CHUNK):
        top = max(top, int(shard.tokens[start : start + CHUNK].max()))
    if cache:
        os.makedirs(cache_dir, exist_ok=True)  # type: ignore[arg-type]
        with open(cache, "w") as f:
            json.dump({"prefix": shard.prefix, "max_id": top}, f)
    return top


def _first_at_or_above(tokens: np.ndarray, limit: int) -> int:
    for start in range(0, len(tokens), CHUNK):
        hits = np.flatnonzero(tokens[start : start + CHUNK] >= limit)
        if len(hits):
            return start + int(hits[0])
    raise AssertionError("no id at or above the limit")  # the maximum said there is one
