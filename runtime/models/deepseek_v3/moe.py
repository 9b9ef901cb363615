"""DeepSeekMoE: router, routed experts with grouped dispatch, shared experts, balancing.

One MoE layer call on x (B, T, C):
  1. router logits (fp32, no autocast) / temperature (+ noise in training), scores = sigmoid|softmax
  2. selection on scores + e_score_correction_bias, group-limited, top-k; the bias never enters the weights
  3. weights = unbiased scores of the chosen experts, optionally renormalised, times route_scale
  4. optional capacity dropping (training only, per sequence in position order, so causal), then
     tokens sorted by expert and all experts run
     as two grouped matmuls (torch._grouped_mm, or a padded bmm where that kernel is unavailable)
  5. routed output + shared experts; returns the sequence-wise aux loss and the z-loss alongside.

Load counts for the bias update and the logging statistics are accumulated as tensors (no host sync)
and only turned into Python numbers by MoEBalancer.stats() (runtime/components/balancer.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generated import FIELDS, PATH
from generated.config import ModelConfig, MoETrainingConfig
from generated.names import ScoreFunc
from runtime.distributed.expert_parallel import expert_counts
from runtime.models.deepseek_v3.kernels import Combine, Dispatch, compute_dtype, run_experts


def _default(path: str) -> Any:
    return FIELDS[path].default


@dataclass(frozen=True)
class RoutingKnobs:
    """The moe section's layer-level settings (spec defaults unless given): the rest of that section
    is the loss's (runtime/components/loss.py) and the balancer's (runtime/components/balancer.py)."""

    router_temperature: float = _default(PATH.moe.router_temperature)
    router_noise_scale: float = _default(PATH.moe.router_noise_scale)
    capacity_factor: float = _default(PATH.moe.capacity_factor)
    drop_tokens: bool = _default(PATH.moe.drop_tokens)

    @classmethod
    def from_config(cls, moe: MoETrainingConfig) -> RoutingKnobs:
        return cls(
            router_temperature=moe.router_temperature,
            router_noise_scale=moe.router_noise_scale,
            capacity_factor=moe.capacity_factor,
            drop_tokens=moe.drop_tokens,
        )


def recomputing() -> bool:
    """True while activation checkpointing recomputes a forward inside the backward (an autograd
    graph task is running): routing loads must be counted once, in the real forward. Under
    torch.compile the question is not traceable; compiled runs take activation checkpointing from
    torch.compile's own recomputation instead, so this is False there."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


@dataclass
class Routing:
    logits: Tensor  # (N, E) fp32, after temperature and noise
    scores: Tensor  # (N, E) sigmoid/softmax of logits, no bias
    idx: Tensor  # (N, K) chosen experts
    weights: Tensor  # (N, K) routing weights (renormalised, scaled)
    keep: Tensor | None  # (N, K) bool, False for assignments dropped over capacity; None = dropless
    max_rows: int | None = None  # with keep: most rows any expert can get (sequences x capacity)


class Router(nn.Module):
    """Scores tokens against experts and picks each token's top-k (DeepSeek-V3 gate)."""

    e_score_correction_bias: Tensor  # (E,) buffer: selection only, moved by MoEBalancer

    def __init__(self, model: ModelConfig, knobs: RoutingKnobs):
        super().__init__()
        self.n_experts = model.n_routed_experts
        self.top_k = model.top_k
        self.n_group = model.n_group
        self.topk_group = model.topk_group
        self.score_func = model.score_func
        self.route_scale = model.route_scale
        self.norm_topk_prob = model.norm_topk_prob
        self.temperature = knobs.router_temperature
        self.noise_scale = knobs.router_noise_scale
        self.weight = nn.Parameter(torch.empty(self.n_experts, model.dim))
        # selection-only bias of aux-loss-free balancing; moved by MoE.update_bias, not by the optimizer
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(self.n_experts), persistent=True
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # x (N, C) -> logits (N, E), scores (N, E), idx (N, K), weights (N, K); all routing in fp32
        autocast = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            logits = F.linear(x.float(), self.weight.float())
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.training and self.noise_scale > 0:
            logits = logits + torch.randn_like(logits) * self.noise_scale
        if self.score_func == ScoreFunc.SOFTMAX:
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        choice = scores.detach() + self.e_score_correction_bias  # (N, E), selection only
        if self.n_group > 1:
            N = choice.shape[0]
            grouped = choice.view(N, self.n_group, -1)  # (N, G, E/G)
            if self.score_func == ScoreFunc.SIGMOID:
                group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(dim=-1)
            best_groups = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(
                1, best_groups, False
            )
            choice = grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).view(N, -1)
        idx = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(1, idx)  # (N, K)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        return logits, scores, idx, weights


def capacity_keep(idx: Tensor, n_seqs: int, n_experts: int, capacity: int) -> Tensor:
    """(N, K) bool mask of the assignments kept: in each sequence, each expert takes its first
    `capacity` assignments in position order (then slot order, i.e. a token's better-ranked experts
    first). idx (N, K) holds n_seqs sequences of N / n_seqs tokens each, sequence-major.

    Causal: whether token t keeps an expert depends only on the tokens at or before t of its own
    sequence. Fully vectorised: a stable sort by (sequence, expert) keeps position order inside each
    group, and each assignment's rank in its group is its index minus the group's start.
    """
    N, K = idx.shape
    flat_e = idx.flatten()  # (N*K,) position-major
    seq = torch.arange(N * K, device=idx.device) // (N * K // n_seqs)
    group = seq * n_experts + flat_e  # (N*K,) one group per (sequence, expert)
    order = group.argsort(stable=True)
    counts = expert_counts(group, n_seqs * n_experts)
    starts = counts.cumsum(0) - counts
    rank_sorted = torch.arange(N * K, device=idx.device) - starts[group[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return (rank < capacity).view_as(idx)


FEW_ROWS = 8  # at most this many (token, expert) rows without grad on CPU: Experts.forward_few


class Experts(nn.Module):
    """n_routed_experts SwiGLU experts with stacked weights.

    w13 (E, 2*I, C) is the fused gate (w1, first half) and up (w3, second half) projection,
    w2 (E, C, I) the down projection.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        # set by runtime/distributed/expert_parallel.py: (w13, w2) -> the local blocks the forward multiplies with
        self.local_weights: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    def forward(
        self,
        xs: Tensor,
        counts: Tensor,
        capacity: int | None = None,
        row_weights: Tensor | None = None,
    ) -> Tensor:
        """xs (M, C) rows sorted by expert, counts (E,) rows per expert -> (M, C), each row scaled by
        row_weights (M,) when given.

        capacity bounds the rows of any expert (drop mode) and spares the padded path a host sync.
        """
        w13: Tensor  # Parameters, or the local blocks local_weights gives
        w2: Tensor
        w13, w2 = self.w13, self.w2
        if self.local_weights is not None:  # expert parallel: this process's experts only
            w13, w2 = self.local_weights(w13, w2)
        return run_experts(xs, counts, w13, w2, capacity, row_weights)

    def forward_few(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        """Inference on a few tokens (a generation step): x (N, C), idx/weights (N, K) -> (N, C) fp32.
        Each chosen expert's weights are used as views, one token's rows at a time, so only K
        experts are read; the CPU grouped matmul would loop over all E groups, mostly empty. One
        host sync (the chosen experts)."""
        dt = compute_dtype(x)
        xd = x.to(dt)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for n, (chosen, scale) in enumerate(zip(idx.tolist(), weights.tolist())):
            row = out[n]
            for e, weight in zip(chosen, scale):
                g, u = F.linear(xd[n], self.w13[e].to(dt)).chunk(2, dim=-1)
                row.add_(F.linear(F.silu(g).mul_(u), self.w2[e].to(dt)), alpha=weight)
        return out

    def forward_reference(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        """Plain loop over experts, for tests and as the benchmark's baseline. x (N, C), idx/weights
        (N, K) (weight 0 = unused). One host sync per expert; unbind keeps the weight gradients to
        one stack (not an (E, ...) zero tensor per expert)."""
        out = torch.zeros_like(x)
        for e, (w13, w2) in enumerate(zip(self.w13.unbind(0), self.w2.unbind(0))):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            g, u = F.linear(x[tok], w13).chunk(2, dim=-1)
            y = F.linear(F.silu(g) * u, w2)
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out


class MoE(nn.Module):
    """DeepSeekMoE layer. `shared_experts` is the dense SwiGLU run on every token (None for none)."""

    def __init__(self, model: ModelConfig, knobs: RoutingKnobs, shared_experts: nn.Module | None):
        super().__init__()
        self.n_experts = model.n_routed_experts
        self.top_k = model.top_k
        self.capacity_factor = knobs.capacity_factor
        self.drop_tokens = knobs.drop_tokens
        self.gate = Router(model, knobs)
        self.experts = Experts(model.n_routed_experts, model.dim, model.moe_inter_dim)
        self.shared_experts = shared_experts
        # runtime/distributed/expert_parallel.py sets this when system.distributed.expert_parallel > 1: it then
        # owns the dispatch (all_to_all to the experts' processes and back)
        self.expert_parallel: Callable[[Tensor, Routing, Experts], Tensor] | None = None
        # plain attributes, not buffers: DDP would broadcast rank 0's buffers over every rank's counts
        self.load_counts: Tensor | None = None  # (E,) assignments since the last bias update
        self.stat_counts: Tensor | None = None  # (E,) assignments since the last stats reset
        self.stat_dropped: Tensor | None = None  # () dropped assignments since the last stats reset

    def capacity(self, seq_len: int) -> int:
        """Assignments each expert takes from one sequence of seq_len tokens (drop mode)."""
        return math.ceil(seq_len * self.top_k / self.n_experts * self.capacity_factor)

    def route(self, x: Tensor, n_seqs: int = 1) -> Routing:
        """x (N, C), n_seqs sequences of N / n_seqs tokens. Drops only in training mode."""
        logits, scores, idx, weights = self.gate(x)
        if not (self.drop_tokens and self.training):
            return Routing(logits, scores, idx, weights, None)
        cap = self.capacity(x.shape[0] // n_seqs)
        keep = capacity_keep(idx, n_seqs, self.n_experts, cap)
        return Routing(logits, scores, idx, weights, keep, n_seqs * cap)

    def forward(
        self, x: Tensor, reference: bool = False, losses: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (B, T, C) -> (out (B, T, C), seq-wise aux loss (), z-loss ()); the two losses are None
        with losses=False (cached generation has no use for them).

        reference=True runs the per-expert loop instead of the grouped dispatch (tests only).
        """
        B, T, C = x.shape
        xf = x.reshape(B * T, C)
        r = self.route(xf, B)
        if reference:
            w = r.weights if r.keep is None else r.weights * r.keep
            routed = self.experts.forward_reference(xf, r.idx, w.to(xf.dtype))
        else:
            routed = self._dispatch(xf, r)
        out = routed.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(xf)
        if self.training and not recomputing():
            self._accumulate(r)
        if not losses:
            return out.view(B, T, C), None, None
        return out.view(B, T, C), self.aux_loss(r.scores, r.idx, B, T), self.z_loss(r.logits)

    def forward_reference(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Same as forward with a plain loop over experts (tests only)."""
        # losses=True (the default): both loss terms are Tensors, never None
        return cast(tuple[Tensor, Tensor, Tensor], self.forward(x, reference=True))

    def _dispatch(self, x: Tensor, r: Routing) -> Tensor:
        # sort the (token, slot) assignments by expert, run all experts at once, sum each token's rows
        if self.expert_parallel is not None:
            return self.expert_parallel(x, r, self.experts)
        N, K = r.idx.shape
        if (
            r.keep is None
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and N * K <= FEW_ROWS
        ):
            return self.experts.forward_few(x, r.idx, r.weights)
        flat_e = r.idx.flatten()  # (N*K,)
        if r.keep is None:  # dropless: no host sync, gathers only (no scatter-add) both ways
            order = flat_e.argsort(stable=True)  # (N*K,) assignment ids grouped by expert
            counts = expert_counts(flat_e, self.n_experts)
            inv = torch.empty_like(order).scatter_(
                0, order, torch.arange(order.numel(), device=order.device)
            )
            tok = order // K
            # cast before the gather: half the rows to cast, half the bytes to gather (under autocast)
            xs = Dispatch.apply(x.to(compute_dtype(x)), tok, inv, K)  # (N*K, C)
            ys = self.experts(xs, counts, None, r.weights.flatten()[order])
            return Combine.apply(ys, tok, inv, K)  # (N, C) fp32
        sel = r.keep.flatten().nonzero().squeeze(1)  # (M,) kept assignments; one host sync
        order = sel[flat_e[sel].argsort(stable=True)]
        counts = expert_counts(flat_e[sel], self.n_experts)
        tok = order // K  # (M,)
        y = self.experts(
            x.to(compute_dtype(x))[tok], counts, r.max_rows, r.weights.flatten()[order]
        )
        return torch.zeros(N, x.shape[1], device=x.device, dtype=torch.float32).index_add(
            0, tok, y.float()
        )

    def aux_loss(self, scores: Tensor, idx: Tensor, B: int, T: int) -> Tensor:
        """Sequence-wise balance loss: mean over sequences of sum_i f_i * P_i."""
        E, K = self.n_experts, self.top_k
        with torch.no_grad():
            counts = torch.zeros(B, E, device=idx.device).scatter_add_(
                1, idx.view(B, T * K), torch.ones(B, T * K, device=idx.device)
            )
            f = counts * (E / (K * T))  # (B, E)
        p = (scores / scores.sum(dim=-1, keepdim=True)).view(B, T, E).mean(dim=1)  # (B, E)
        return (f * p).sum(dim=-1).mean()

    @staticmethod
    def z_loss(logits: Tensor) -> Tensor:
        return torch.logsumexp(logits, dim=-1).square().mean()

    @torch.no_grad()
    def _accumulate(self, r: Routing) -> None:
        counts = expert_counts(r.idx.flatten(), self.n_experts)
        dropped = (~r.keep).sum() if r.keep is not None else counts.new_zeros(())
        self.load_counts = counts if self.load_counts is None else self.load_counts + counts
        self.stat_counts = counts if self.stat_counts is None else self.stat_counts + counts
        self.stat_dropped = dropped if self.stat_dropped is None else self.stat_dropped + dropped

    @torch.no_grad()
    def update_bias(self, load: Tensor, speed: float) -> None:
        """bias += speed * sign(mean load - load). load (E,) is already summed over processes;
        speed is the scheduled one (runtime/components/balancer.py)."""
        load = load.float()
        bias = self.gate.e_score_correction_bias
        bias += speed * torch.sign(load.mean() - load).to(bias)

    def reset_stats(self) -> None:
        self.stat_counts = None
        self.stat_dropped = None
