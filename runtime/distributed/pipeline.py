"""Pipeline parallelism with `torch.distributed.pipelining`: the process groups of a pipelined
layout, the stages of this process and the chosen schedule, and a forward-only pass for
evaluation and sampling. Model-agnostic: a family cuts its model into stage modules
(runtime/models/deepseek_v3/pipeline.py) whose forward is `module(x, tokens=window)`.

Ranks (runtime/distributed/layout.py): rank = p * D + d, p the pipeline rank, d the data-parallel
rank among the D = world / P processes of a stage. The pipeline of d is ranks d, D + d, ...; the
data-parallel group of p is ranks p * D .. p * D + D - 1. Stage s runs on pipeline rank
`stage_ranks(...)[s]` (looped, or V-shaped for zbv and dualpipev).

A step: every process of a pipeline calls the schedule with the step's whole window batch (its
micro-batches are the step's micro-batches of this data-parallel rank); the first stage reads it
as input, every stage as the `tokens` keyword. The last stage's loss_fn returns each micro-batch's
share of the step's loss, so gradients need no rescaling (`scale_grads=False`). Then gradients are
averaged over the data-parallel group, and the embedding's two copies (first and last stage on
different processes) summed, before clipping and the optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from generated.names import PipelineSchedule
from runtime.distributed.layout import Layout, stage_ranks

V_SCHEDULES = (PipelineSchedule.ZBV, PipelineSchedule.DUALPIPEV)


def schedule_class(name: str) -> type:
    from torch.distributed.pipelining import schedules

    return {
        PipelineSchedule.GPIPE: schedules.ScheduleGPipe,
        PipelineSchedule.V1F1B: schedules.Schedule1F1B,
        PipelineSchedule.INTERLEAVED_1F1B: schedules.ScheduleInterleaved1F1B,
        PipelineSchedule.ZBV: schedules.ScheduleZBVZeroBubble,
        PipelineSchedule.DUALPIPEV: schedules.ScheduleDualPipeV,
    }[PipelineSchedule(name)]


def micro_batch_problem(
    schedule: str, n_micro: int, pipeline_parallel: int, stages: int
) -> str | None:
    """Why `n_micro` micro-batches per step cannot run `schedule` on `pipeline_parallel`
    processes of `stages` stages (torch 2.13's conditions), or None."""
    name = PipelineSchedule(schedule)
    if name in (PipelineSchedule.V1F1B, PipelineSchedule.DUALPIPEV) and n_micro < stages:
        return f"{name} needs at least as many micro-batches as stages ({stages})"
    if name == PipelineSchedule.INTERLEAVED_1F1B:
        rounds = max(1, n_micro // pipeline_parallel)
        if n_micro % rounds:
            return (
                f"{name} needs a multiple of its {rounds} rounds (micro-batches // "
                f"pipeline_parallel)"
            )
    return None


@dataclass
class PipelineGroups:
    """This process's place in a pipelined layout and its process groups."""

    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    pp_group: Any  # ProcessGroup of this process's pipeline
    dp_group: Any  # ProcessGroup of the processes holding the same stages (None: alone)
    tie_group: Any  # first and last stage's processes of this pipeline (None: one process)
    pp_ranks: list[int]  # global ranks of this pipeline, by pipeline rank

    def global_rank(self, pp_rank: int) -> int:
        return self.pp_ranks[pp_rank]


def pipeline_groups(layout: Layout, rank: int, v_shaped: bool) -> PipelineGroups:
    """Create every pipeline, data-parallel and embedding-tie group (each process creates all of
    them, in the same order, as new_group requires) and return this process's."""
    P, D = layout.pipeline_parallel, layout.data_parallel
    p, d = divmod(rank, D)
    mine: dict[str, Any] = {"pp": None, "dp": None, "tie": None}
    for j in range(D):
        ranks = [i * D + j for i in range(P)]
        group = dist.new_group(ranks)
        if j == d:
            mine["pp"] = group
    for i in range(P):
        group = dist.new_group([i * D + j for j in range(D)]) if D > 1 else None
        if i == p:
            mine["dp"] = group
    if not v_shaped:  # the first and last stages are on pipeline ranks 0 and P - 1
        for j in range(D):
            group = dist.new_group([j, (P - 1) * D + j])
            if j == d:
                mine["tie"] = group
    return PipelineGroups(
        p, P, d, D, mine["pp"], mine["dp"], mine["tie"], [i * D + d for i in range(P)]
    )


class Pipeline:
    """This process's stages of a pipeline and the schedule that runs them (module doc)."""

    def __init__(
        self,
        modules: dict[int, nn.Module],
        *,
        num_stages: int,
        schedule: str,
        groups: PipelineGroups,
        device: torch.device,
        loss_fn: Callable[..., torch.Tensor],
    ) -> None:
        from torch.distributed.pipelining import PipelineStage

        self.modules, self.num_stages, self.groups = modules, num_stages, groups
        self.schedule_name, self.loss_fn, self.device = schedule, loss_fn, device
        v_shaped = schedule in V_SCHEDULES
        self.owner = stage_ranks(v_shaped, groups.pp_size, num_stages // groups.pp_size)
        self.stages = [
            PipelineStage(module, index, num_stages, device, group=groups.pp_group)
            for index, module in sorted(modules.items())
        ]
        self._schedules: dict[int, Any] = {}
        self._initialized: set[int] = set()

    @property
    def holds_first(self) -> bool:
        return 0 in self.modules

    @property
    def holds_last(self) -> bool:
        return self.num_stages - 1 in self.modules

    def _schedule(self, n_micro: int) -> Any:
        """The schedule for steps of `n_micro` micro-batches (one per size: the batch-size
        ramp changes it)."""
        if n_micro not in self._schedules:
            from torch.distributed.pipelining.schedules import PipelineScheduleMulti

            cls = schedule_class(self.schedule_name)
            multi = issubclass(cls, PipelineScheduleMulti)
            stages: Any = self.stages if multi else self.stages[0]
            self._schedules[n_micro] = cls(
                stages, n_microbatches=n_micro, loss_fn=self.loss_fn, scale_grads=False
            )
        return self._schedules[n_micro]

    def step(
        self, windows: torch.Tensor, n_micro: int, probing: Callable[[], Any] | None = None
    ) -> None:
        """Forward and backward of a step's `n_micro` micro-batches (windows (n * B, W), every
        process of the pipeline the same). A new schedule first infers the stages' shapes by
        running micro-batch 0 through them (torch's metadata inference): that runs inside
        `probing()`, a context in which the stages count nothing (loads, losses)."""
        schedule = self._schedule(n_micro)
        if n_micro not in self._initialized:
            first = windows[: windows.shape[0] // n_micro]
            args = (first,) if self.holds_first else ()
            # the schedules' own initialisation, ahead of the step (torch 2.13's private API;
            # the step would otherwise run it on micro-batch 0 and count that forward twice)
            init = getattr(schedule, "_initialize_stages", None) or schedule._initialize_stage
            with probing() if probing is not None else contextlib.nullcontext():
                init(args, {"tokens": first}, first)
            self._initialized.add(n_micro)
        args = (windows,) if self.holds_first else ()
        schedule.step(*args, target=windows, tokens=windows)  # target: unused by loss_fn

    # ---- forward only (evaluation, sampling): the stages in order, hidden states sent between
    # processes by hand (no schedule, no backward)

    def forward(
        self,
        x: torch.Tensor,
        hidden_shape: Sequence[int],
        out_shape: Sequence[int],
        call: Callable[[nn.Module, int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The last stage's output for input `x`, on every process of the pipeline: `call(module,
        stage, input)` runs one stage (input: `x` for the first, the previous stage's hidden state
        (hidden_shape, float32) for the others)."""
        groups, h = self.groups, x
        me = groups.pp_rank
        for s in range(self.num_stages):
            if self.owner[s] != me:
                continue
            if s > 0:
                if self.owner[s - 1] != me:
                    h = torch.empty(tuple(hidden_shape), device=self.device)
                    dist.recv(h, src=groups.global_rank(self.owner[s - 1]), group=groups.pp_group)
            out = call(self.modules[s], s, h)
            h = out
            if s + 1 < self.num_stages and self.owner[s + 1] != me:
                dist.send(
                    out.float().contiguous(),
                    dst=groups.global_rank(self.owner[s + 1]),
                    group=groups.pp_group,
                )
        last_owner = self.owner[self.num_stages - 1]
        result = h.float().contiguous() if last_owner == me else torch.empty(tuple(out_shape))
        result = result.to(self.device)
        dist.broadcast(result, src=groups.global_rank(last_owner), group=groups.pp_group)
        return result


def average_over(params: Sequence[torch.Tensor], group: Any, size: int) -> None:
    """Average the gradients of `params` over `group` (the data-parallel processes of a stage)."""
    if group is None or size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's block on this process (FSDP2 / expert parallel), a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def sum_over(params: Sequence[torch.Tensor], group: Any) -> None:
    """Sum the gradients of `params` over `group` (the embedding's copies, sharded alike on both
    processes when FSDP2 shards them)."""
    if group is None:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(_local(p.grad), group=group)


@torch.no_grad()
def clip_pipeline_grad_norm(
    params: Sequence[torch.Tensor], max_norm: float, stage_processes: int
) -> torch.Tensor:
    """clip_grad_norm_ over a whole pipeline: each process's share of the squared norm of the
    weights it holds (each counted once: a copy's parameters on one process only; a block of a
    DTensor once per replica) summed over every process; each scales by the same factor.
    `stage_processes`: the processes holding one stage (the data-parallel ones)."""
    from runtime.distributed.data_parallel import square_share

    grads = [p.grad for p in params if p.grad is not None]
    shares = [square_share(g, stage_processes) for g in grads]
    total = torch.stack(shares).sum() if shares else torch.zeros(())
    dist.all_reduce(total)
    norm = total.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            local = _local(g)
            local.mul_(coef.to(local.device, local.dtype))
    return norm
