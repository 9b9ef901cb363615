"""Training on a weighted mixture of token sources (`data.sources`): which source and which
window each sample reads, as a pure function of (seed, sample id).

A source is a prepared dataset folder (prepare.py: shards, held-out validation shards, the
tokenizer, a manifest) or a Megatron-LM prefix (indexed.py). Its training tokens are cut into
windows of `seq_len + 1 + mtp_depth` tokens every `seq_len` tokens (within a shard), n_s of them.

  * Which source: sample i goes to the source of the i-th "tick" when every source s ticks at
    (k + 1/2) / w_s, k = 0, 1, ... (weights w_s; ties go to the earlier source). This is
    Sainte-Lague apportionment done sample by sample: after any m samples source s has had
    round(m * w_s / sum(w)) of them, give or take one, and the count after m samples has a closed
    form (Fractions, exact), so any sample's source is computed without replaying the ones
    before it.
  * Which window: the k-th sample of source s reads window perm_e(k mod n_s) of epoch
    e = k // n_s, where perm_e is a pseudo-random permutation of 0..n_s-1 keyed by (seed, s, e)
    (a Feistel network: nothing the size of the source is ever built). Within an epoch every
    window is read once; a source that runs out starts its next epoch in a new order.

So the tokens seen per source and its epoch after any step are functions of the step alone, a
resumed run reads exactly what an uninterrupted one would, and any world size sees the same global
batch (processes take their slices of the same sample ids).

Validation: `data.validation` (one more source, read whole) or, without it, each source's held-out
documents: a prepared folder's validation shards (documents chosen by hash at prepare time,
whole documents spread over the corpus), or, for a Megatron prefix, its last whole documents,
about `val_split` of its tokens. Validation samples go through the sources by the same weights
and read their windows in order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from generated import PATH
from runtime.components.data.indexed import IndexedDataset, IndexedFormatError, prefix_of
from runtime.components.data.prepare import MANIFEST
from runtime.components.tokenizer import TOKENIZER_FILE

# ---------------------------------------------------------------------------------------------
# which source: exact weighted interleaving


class Interleave:
    """Source of each sample of a weighted mixture (Sainte-Lague, see the module doc). Source s
    ticks at (2k + 1) / (2 w_s) for k = 0, 1, ...; all comparisons are exact integer ones."""

    def __init__(self, weights: Sequence[float]) -> None:
        exact = [Fraction(w).limit_denominator(10**6) for w in weights]
        scale = math.lcm(*(f.denominator for f in exact))
        self.w = [int(f * scale) for f in exact]  # integer weights, same ratios
        self._cursor = -1  # the next sample locate() can take without a search
        self._next: list[int] = []  # each source's count so far at the cursor

    def _at_or_below(self, num: int, den: int) -> int:
        """Ticks of all sources at or below num / den (den > 0)."""
        # (2k + 1) / (2 w) <= num / den  <=>  k <= (2 num w - den) / (2 den)
        return sum(max(0, (2 * num * w - den) // (2 * den) + 1) for w in self.w)

    def counts(self, m: int) -> list[int]:
        """Samples each source has had among the first m."""
        if m <= 0:
            return [0] * len(self.w)
        # the m-th tick: the smallest tick with at least m ticks at or below it
        best: tuple[int, int] | None = None  # (num, den) of that tick
        for ws in self.w:
            lo, hi = 0, m - 1  # source s's m-th tick has m ticks at or below it
            while lo < hi:
                k = (lo + hi) // 2
                if self._at_or_below(2 * k + 1, 2 * ws) >= m:
                    hi = k
                else:
                    lo = k + 1
            tick = (2 * lo + 1, 2 * ws)
            if best is None or tick[0] * best[1] < best[0] * tick[1]:
                best = tick
        assert best is not None
        num, den = best
        # ticks strictly below it, then the ties at it in source order
        below = [max(0, -((-(2 * num * w - den)) // (2 * den))) for w in self.w]
        left = m - sum(below)
        for s, w in enumerate(self.w):
            if left and (2 * num * w - den) % (2 * den) == 0 and 2 * num * w >= den:
                below[s] += 1
                left -= 1
        return below

    def locate(self, i: int) -> tuple[int, int]:
        """(source, index of the sample within its source) of sample i; consecutive calls with
        i, i + 1, ... cost one comparison per source each."""
        if i != self._cursor:
            self._next, self._cursor = self.counts(i), i
        counts = self._next
        # the earliest next tick: (2 c + 1) / (2 w), ties to the lower source
        s = min(range(len(self.w)), key=lambda r: Fraction(2 * counts[r] + 1, 2 * self.w[r]))
        k = counts[s]
        counts[s] += 1
        self._cursor += 1
        return s, k


# ---------------------------------------------------------------------------------------------
# which window: a keyed permutation that is never materialised


def _round_key(seed: int, source: int, epoch: int, r: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{source}/{epoch}/{r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Permutation:
    """A pseudo-random permutation of 0..n-1 keyed by (seed, source, epoch): a 4-round Feistel
    network on the smallest even-bit square above n, with cycle walking."""

    def __init__(self, n: int, seed: int, source: int, epoch: int) -> None:
        self.n = n
        bits = max(2, (max(1, n - 1)).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_round_key(seed, source, epoch, r) for r in range(4)]

    def _round(self, x: int, key: int) -> int:
        x = (x * 0x9E3779B97F4A7C15 + key) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        return (x ^ (x >> 32)) & self.mask

    def __call__(self, i: int) -> int:
        assert 0 <= i < self.n, (i, self.n)
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for key in self.keys:
                left, right = right, left ^ self._round(right, key)
            x = (left << self.half) | right
            if x < self.n:
                return x


# ---------------------------------------------------------------------------------------------
# sources


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


# ---------------------------------------------------------------------------------------------
# the datasets the loaders read


class MixtureDataset(Dataset):
    """Training windows: sample i -> its source and window (module doc). int64 (window,) tensors."""

    def __init__(self, sources: list[TokenSource], weights: Sequence[float], seed: int) -> None:
        self.sources, self.seed = sources, seed
        self.interleave = Interleave(weights)
        self._perms: dict[tuple[int, int], Permutation] = {}

    def locate(self, i: int) -> tuple[int, int, int]:
        """(source, epoch, window index) of sample i."""
        s, k = self.interleave.locate(i)
        n = self.sources[s].train.n_windows
        epoch, j = divmod(k, n)
        perm = self._perms.get((s, epoch))
        if perm is None:
            if len(self._perms) > 64:
                self._perms.clear()
            perm = self._perms[(s, epoch)] = Permutation(n, self.seed, s, epoch)
        return s, epoch, perm(j)

    def __len__(self) -> int:
        return 2**62  # endless: sources start new epochs

    def __getitem__(self, i: int) -> Tensor:
        s, _, j = self.locate(int(i))
        return torch.from_numpy(self.sources[s].train.window_at(j).astype(np.int64))

    def seen(self, samples: int) -> list[int]:
        """Samples each source has given after the first `samples` of the run."""
        return self.interleave.counts(samples)


class ValidationDataset(Dataset):
    """Validation windows: sample i -> a source by the same weights, its windows in order."""

    def __init__(self, parts: list[Part], weights: Sequence[float]) -> None:
        self.parts = parts
        self.interleave = Interleave(weights)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> Tensor:
        s, k = self.interleave.locate(int(i))
        part = self.parts[s]
        return torch.from_numpy(part.window_at(k % part.n_windows).astype(np.int64))
