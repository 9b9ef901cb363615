"""Which sample ids each process reads at each step: training micro-batches and the fixed
validation batches.

Every training window is a pure function of (seed, sample id). Optimizer step `s` consumes the
global micro-batches `m = 0 .. gradient_accumulation_steps-1`; micro-batch `m` holds the sample ids
`(s * accum + m) * batch_size + b`; process `r` of `W` takes the contiguous slice of micro-batches
`r * accum/W .. (r+1) * accum/W - 1`. So the data position is just the step: resuming at step N
(`StepBatchSampler(start_step=N)`) gives exactly the batches of the uninterrupted run, and W
processes see the same global batch as one process with the same global settings.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

from generated import PATH
from runtime.components.data.errors import DataError


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
