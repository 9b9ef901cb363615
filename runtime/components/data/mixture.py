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
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from runtime.components.data.sources import Part, TokenSource

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
