"""Which sample ids each process reads at each step: training micro-batches (BatchPlan) and the
fixed validation batches.

Every training window is a pure function of (seed, sample id), and the ids a step reads are a pure
function of its optimizer step `s` (0-based):
  * its data position p: s, plus the steps of every `data.skip_steps` range that begins at or
    before s (a skipped range is skipped whole, and the batches after it move up);
  * the global batch of position p, batch(p) sequences (training.batch_size_start ... ramp,
    runtime/configlib/quantities.py's BatchRamp), holds the ids samples_before(p) ..
    samples_before(p) + batch(p) - 1; its micro-batch m holds `batch_size` of them from
    samples_before(p) + m * batch_size;
  * process r of W takes the contiguous micro-batches r*k .. (r+1)*k - 1, k = batch(p) /
    batch_size / W.
Without a ramp or skips micro-batch m of step s holds `(s * accum + m) * batch_size + b`. Resuming
at step N gives exactly the batches of the uninterrupted run, and W processes see the same global
batch as one process with the same global settings.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from generated import PATH
from runtime.components.data.errors import DataError
from runtime.configlib.quantities import BatchRamp


def parse_skips(written: Sequence[str]) -> list[tuple[int, int]]:
    """data.skip_steps ("A-B" or "N", from 1) as sorted (first, last) 0-based optimizer steps;
    a backwards or overlapping range is a DataError."""
    ranges = []
    for text in written:
        first, _, last = text.partition("-")
        ranges.append((int(first) - 1, int(last or first) - 1, text))
    ranges.sort()
    for (_, end, a), (start, stop, b) in zip([(-1, -1, "")] + ranges, ranges):
        if stop < start:
            raise DataError(f"{PATH.data.skip_steps}: {b!r} ends before it begins")
        if start <= end:
            raise DataError(f"{PATH.data.skip_steps}: {a!r} and {b!r} overlap")
    return [(first, last) for first, last, _ in ranges]


def span_text(span: range) -> str:
    """0-based steps or data positions as the 1-based `5-6` (or `9`) a log line shows."""
    return f"{span.start + 1}-{span.stop}" if len(span) > 1 else f"{span.start + 1}"


class BatchPlan:
    """The sample ids of every optimizer step on process `rank` of `world_size` (module doc)."""

    def __init__(
        self,
        ramp: BatchRamp,
        *,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        skip_steps: Sequence[str] = (),
    ) -> None:
        self.ramp, self.batch_size = ramp, batch_size
        self.world_size, self.rank = world_size, rank
        self.skips = parse_skips(skip_steps)
        per_step = batch_size * world_size  # one micro-batch on every process
        for stage in ramp.stages:
            if stage.batch % per_step:
                raise DataError(self._split_error(stage.batch))

    def _split_error(self, batch: int) -> str:
        """Why a global batch does not split into whole micro-batches per process."""
        if not self.ramp.ramps:
            return (
                f"{PATH.training.gradient_accumulation_steps} ({batch // self.batch_size}) must "
                f"divide by the number of processes ({self.world_size})"
            )
        ramp, size, world = self.ramp, self.batch_size, self.world_size
        return (
            f"the batch-size ramp's global batch of {batch} sequences does not split into whole "
            f"micro-batches of {PATH.training.batch_size} ({size}) on each of {world} processes: "
            f"{PATH.training.batch_size_start} ({ramp.start}), {PATH.training.batch_size_increment} "
            f"({ramp.increment}) and the full batch ({PATH.training.batch_size} * "
            f"{PATH.training.gradient_accumulation_steps} = {ramp.full}) must each be a multiple "
            f"of {size * world} ({PATH.training.batch_size} * {world} processes)"
        )

    def for_rank(self, rank: int) -> BatchPlan:
        """The same plan as process `rank` reads it."""
        plan = copy.copy(self)
        plan.rank = rank
        return plan

    # ---- data positions

    def _skipped(self) -> Iterator[tuple[int, range]]:
        """(first step, the data positions it skips) of every skip range, in order."""
        moved = 0
        for first, last in self.skips:
            yield first, range(first + moved, first + moved + last - first + 1)
            moved += last - first + 1

    def position(self, step: int) -> int:
        """The data position of optimizer step `step`: the step of a run without skips that
        reads the same batch."""
        return step + sum(last - first + 1 for first, last in self.skips if first <= step)

    def skipped_at(self, step: int) -> range:
        """The data positions a skip range beginning at `step` skips (empty if none begins)."""
        return next((gap for first, gap in self._skipped() if first == step), range(0))

    def skipped_batches(self, steps: int) -> int:
        """Batches the first `steps` optimizer steps skipped."""
        return self.position(steps - 1) - (steps - 1) if steps else 0

    def skips_text(self) -> str:
        """What data.skip_steps skips (`at step 5 batches 5-6, at step 8 batch 10`): batch N is
        the one step N of a run without skips reads."""
        return ", ".join(
            f"at step {first + 1} batch{'es' if len(gap) > 1 else ''} {span_text(gap)}"
            for first, gap in self._skipped()
        )

    # ---- batches

    def global_batch(self, step: int) -> int:
        """Sequences of optimizer step `step`, all processes and micro-batches together."""
        return self.ramp.batch(self.position(step))

    def micro_per_rank(self, step: int) -> int:
        """Micro-batches this process runs in optimizer step `step`."""
        return self.global_batch(step) // (self.batch_size * self.world_size)

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (sample ids) of optimizer step `step`."""
        position = self.position(step)
        k = self.micro_per_rank(step)
        first = self.ramp.samples_before(position) + self.rank * k * self.batch_size
        return [
            list(range(first + m * self.batch_size, first + (m + 1) * self.batch_size))
            for m in range(k)
        ]

    def trained_ids(self, steps: int) -> list[range]:
        """The sample ids the first `steps` optimizer steps trained on (all processes), as
        increasing runs: skipped batches are left out."""
        if steps <= 0:
            return []
        runs, start = [], 0
        for first, gap in self._skipped():
            if first >= steps:
                break
            runs.append(range(self.ramp.samples_before(start), self.ramp.samples_before(gap.start)))
            start = gap.stop
        end = self.position(steps - 1) + 1
        runs.append(range(self.ramp.samples_before(start), self.ramp.samples_before(end)))
        return [run for run in runs if run]

    def samples_trained(self, steps: int) -> int:
        """Sequences the first `steps` optimizer steps trained on (skipped batches not counted)."""
        return sum(len(run) for run in self.trained_ids(steps))


class StepBatchSampler(Sampler):
    """Yields this process's micro-batches (lists of sample ids) for steps start_step..end_step-1
    of `plan`. Its whole state is `start_step`: resuming builds a new sampler at the resumed step."""

    def __init__(self, plan: BatchPlan, start_step: int, end_step: int) -> None:
        self.plan, self.start_step, self.end_step = plan, start_step, end_step

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            yield from self.plan.micro_batches(step)

    def __len__(self) -> int:
        plan = self.plan
        if self.end_step <= self.start_step:
            return 0
        samples = plan.samples_trained(self.end_step) - plan.samples_trained(self.start_step)
        return samples // (plan.batch_size * plan.world_size)


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
