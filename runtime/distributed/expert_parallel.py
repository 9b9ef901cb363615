"""Expert parallelism: each MoE layer's routed experts split over the processes of an EP group.

`system.distributed.expert_parallel` = P processes form a group; process p holds experts
p*E/P .. (p+1)*E/P - 1 of every MoE layer (the `Experts` weights become DTensors sharded on dim 0
over the group's mesh, so torch.distributed.checkpoint saves them with their global shape and
resumes them on any layout). Every process routes its own tokens over all E experts, then:

  1. dispatch: the (token, slot) assignments sorted by expert; rows of x for the experts of process
     q go to q (all_to_all_single, uneven splits; the counts per expert go first in a small one)
  2. the received rows are regrouped by local expert (they arrive grouped by source process) and run
     through this process's experts (the model's module: the same grouped matmul as without EP)
  3. combine: the outputs go back the same way (the reverse all_to_all), are scaled by their routing
     weights on the token's own process and summed per token in fp32.

Both all_to_alls have a backward (the reverse all_to_all of the gradient). The objective is the mean
of the processes' losses (DDP's and FSDP's average): non-expert gradients are averaged by FSDP over
all processes, but an expert's gradient gathers the contributions of all P processes of its group
through the all_to_all backward and is averaged only over the remaining data-parallel processes, so
the expert weights pass through a gradient scale of 1/P.

Balancing needs nothing new: each process counts its tokens' assignments over all E experts (global
ids) and the balancer (runtime/components/balancer.py) sums them over every process. Capacity dropping
(`moe.drop_tokens`) is decided per sequence, before dispatch, so it is the same on any layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor


class Assignment(Protocol):
    """What a router decided for N tokens over all E experts (the MoE layer's routing)."""

    idx: Tensor  # (N, K) chosen experts
    weights: Tensor  # (N, K) routing weights
    keep: Tensor | None  # (N, K) bool, False for assignments dropped over capacity; None = dropless
    max_rows: int | None  # with keep: most rows any expert can get


# (rows sorted by local expert, rows per local expert, capacity or None) -> the experts' outputs;
# a module's __call__, so that FSDP's hooks gather its weights
LocalExperts = Callable[[Tensor, Tensor, int | None], Tensor]


def expert_counts(flat_e: Tensor, n_experts: int) -> Tensor:
    """(E,) int64 number of entries of flat_e equal to each expert. Like bincount, but with a static
    output shape, so torch.compile captures it without a graph break."""
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat_e.device)
    return counts.scatter_add_(0, flat_e, torch.ones_like(flat_e))


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; the backward sends the gradient back the
    reverse way."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup
    ) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        out = g.new_empty((sum(ctx.send), *g.shape[1:]))
        dist.all_to_all_single(out, g.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return g * ctx.scale, None


def _local(w: Tensor) -> Tensor:
    # a DTensor (sharded over the EP mesh, gathered by FSDP over the data-parallel ones) -> its
    # local (E/P, ...) block, with autograd back to the DTensor
    return w.to_local() if hasattr(w, "to_local") else w


class ExpertParallel:
    """The dispatch of one MoE layer under expert parallelism (MoE.expert_parallel)."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.n_experts = n_experts
        self.n_local = n_experts // self.size

    def local_weights(self, w13: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
        """Experts.local_weights: the (E/P, ...) blocks of this process, gradients scaled by 1/P."""
        scale = 1.0 / self.size
        return _ScaleGrad.apply(_local(w13), scale), _ScaleGrad.apply(_local(w2), scale)

    def __call__(self, x: Tensor, r: Assignment, experts: LocalExperts) -> Tensor:
        """x (N, C) this process's tokens, r their routing over all E experts -> routed output
        (N, C) fp32."""
        N, K = r.idx.shape
        P, El = self.size, self.n_local
        flat_e = r.idx.flatten()  # (N*K,)
        if r.keep is None:
            order = flat_e.argsort(stable=True)  # assignments grouped by global expert
        else:
            sel = r.keep.flatten().nonzero().squeeze(1)
            order = sel[flat_e[sel].argsort(stable=True)]
        counts = expert_counts(flat_e[order], self.n_experts)  # (E,) rows this process sends
        # counts[q*El + e] rows go to process q's local expert e; learn what comes back the same way
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # (P*El,) by source, expert
        send = counts.view(P, El).sum(1).tolist()
        recv_by = recv_counts.view(P, El)
        recv = recv_by.sum(1).tolist()
        tok = order // K
        xs = _AllToAll.apply(x.index_select(0, tok), send, recv, self.group)  # (M_recv, C)
        # rows arrive grouped by (source, local expert); regroup by (local expert, source)
        M = xs.shape[0]
        block = torch.repeat_interleave(
            torch.arange(P * El, device=x.device), recv_by.flatten(), output_size=M
        )
        source, expert = block // El, block % El
        perm = (expert * P + source).argsort(stable=True)
        capacity = None if r.max_rows is None else r.max_rows * P
        # through the module's forward, so that FSDP's hooks gather its weights (local_weights)
        ys = experts(xs[perm], recv_by.sum(0), capacity)  # (M_recv, C)
        back = torch.empty_like(perm)
        back[perm] = torch.arange(M, device=x.device)
        y = _AllToAll.apply(ys.index_select(0, back), recv, send, self.group)  # (M_sent, C)
        y = y.float() * r.weights.flatten()[order].unsqueeze(1)
        return torch.zeros(N, x.shape[1], device=x.device, dtype=torch.float32).index_add(0, tok, y)
