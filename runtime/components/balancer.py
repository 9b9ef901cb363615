"""Aux-loss-free balancing (DeepSeek-V3): the router biases' update rule and the load counts.

The MoE layers count, in training-mode forwards, how many assignments each expert got
(runtime/models/deepseek_v3/moe.py). After each applied optimizer step the balancer moves every layer's selection bias
by gamma(step) * sign(mean load - load), with the loads summed over processes; a skipped step
discards its counts. gamma follows the moe section's schedule (bias_update_speed, then
bias_update_speed_final from bias_update_speed_until on). The biases themselves are buffers of the
model (its state_dict, and the released weights' e_score_correction_bias); the balancer's own state
is the counts not yet applied. It also reads the routing statistics for the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from generated.config import MoETrainingConfig

if TYPE_CHECKING:
    from runtime.models.deepseek_v3.moe import MoE


def _sum_over_all(loads: Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads)


def bias_update_speed_at(moe: MoETrainingConfig, step: int) -> float:
    """gamma at optimizer step `step`: bias_update_speed, then bias_update_speed_final from
    bias_update_speed_until on. `deepseek-moe schedule` prints this too."""
    speed, final = moe.bias_update_speed, moe.bias_update_speed_final  # both read, whatever step
    until = moe.bias_update_speed_until
    return speed if until is None or step < until else final


class MoEBalancer:
    """Stateful (state_dict / load_state_dict): the pending load counts of `model`'s MoE layers."""

    def __init__(
        self,
        model: nn.Module,
        moe: MoETrainingConfig,
        sum_loads: Callable[[Tensor], None] | None = None,
    ):
        """`sum_loads`: sums a (layers, experts) load tensor in place over the processes that
        hold the same layers; None: over all processes (when torch.distributed is initialised).
        A pipelined run passes its stage's data-parallel group."""
        self.sum_loads = sum_loads or _sum_over_all
        # (layer index, MoE layer) of a model with routed experts (its family lists them)
        moe_layers = getattr(model, "moe_layers", None)
        self.layers: list[tuple[int, MoE]] = moe_layers() if moe_layers is not None else []
        self.moe = moe

    def bias_update_speed(self, step: int) -> float:
        """gamma at optimizer step `step` (bias_update_speed_at)."""
        return bias_update_speed_at(self.moe, step)

    @torch.no_grad()
    def update(self, step: int = 0) -> None:
        """Aux-loss-free balancing step; call once after each applied optimizer step `step` (on
        every process); a skipped step calls discard() instead.

        Uses the loads counted in training-mode forwards since the previous call, summed over
        processes when torch.distributed is initialised, and the speed scheduled for `step`.
        """
        if not self.layers:
            return
        speed = self.bias_update_speed(step)
        if speed > 0:
            layers = [m for _, m in self.layers]
            dev = layers[0].gate.e_score_correction_bias.device
            none = torch.zeros(layers[0].n_experts, device=dev, dtype=torch.long)
            counts = [none if m.load_counts is None else m.load_counts.to(dev) for m in layers]
            loads = torch.stack(counts).float()  # (L, E)
            self.sum_loads(loads)
            for m, load in zip(layers, loads):
                m.update_bias(load, speed)  # a layer that saw no tokens gets sign(0) = no change
        self.discard()

    def discard(self) -> None:
        """Forget the loads counted since the last update (a step that was not applied)."""
        for _, m in self.layers:
            m.load_counts = None

    def stats(self, gather: Callable[[list[Any]], list[Any]] | None = None) -> dict[str, Any]:
        """Routing statistics of the training-mode forwards since the last reset_stats(), on this
        process only, or with `gather` (a pipeline stage's process) over the layers every
        process of the pipeline holds: gather(this process's [(layer, counts, dropped)]) -> all
        of them. Keys moe/layer{i}/... per MoE layer (MTP blocks included) and
        moe/max_load_ratio, moe/cv, moe/dropped_frac over all of them."""
        # (layer index, counts, dropped) of the layers that ran (_accumulate sets both together)
        ran = [
            (i, m.stat_counts, m.stat_dropped)
            for i, m in self.layers
            if m.stat_counts is not None and m.stat_dropped is not None
        ]
        seen: list[Any] = []
        if ran:
            counts = torch.stack([c for _, c, _ in ran]).cpu()  # (L, E), one sync
            dropped = torch.stack([d for _, _, d in ran]).cpu().tolist()
            seen = [(i, c, d) for (i, _, _), c, d in zip(ran, counts, dropped)]
        if gather is not None:
            seen = sorted(gather(seen), key=lambda row: row[0])
        if not seen:
            return {}
        counts = torch.stack([c for _, c, _ in seen])
        dropped = [d for _, _, d in seen]
        out: dict[str, float | list[int]] = {}
        ratios, cvs = [], []
        for (i, _, _), c, d in zip(seen, counts, dropped):
            cf = c.double()
            mean = cf.mean().item()
            ratio = cf.max().item() / mean if mean > 0 else 0.0
            cv = cf.std(unbiased=False).item() / mean if mean > 0 else 0.0
            p = f"moe/layer{i}/"
            out[p + "tokens_per_expert"] = c.tolist()
            out[p + "max_load"] = float(cf.max().item())
            out[p + "mean_load"] = mean
            out[p + "max_load_ratio"] = ratio
            out[p + "cv"] = cv
            out[p + "dropped_frac"] = d / max(cf.sum().item(), 1.0)
            ratios.append(ratio)
            cvs.append(cv)
        out["moe/max_load_ratio"] = max(ratios)
        out["moe/cv"] = sum(cvs) / len(cvs)
        out["moe/dropped_frac"] = sum(dropped) / max(counts.sum().item(), 1)
        return out

    def reset_stats(self) -> None:
        for _, m in self.layers:
            m.reset_stats()

    def state_dict(self) -> dict[str, Tensor]:
        """{layer index as str: (E,) load counts not yet applied}; empty between steps."""
        return {str(i): m.load_counts for i, m in self.layers if m.load_counts is not None}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        known = {str(i) for i, _ in self.layers}
        if set(state) - known:
            raise ValueError(
                f"load counts of MoE layers {sorted(set(state) - known)} this model lacks"
            )
        for i, m in self.layers:
            counts = state.get(str(i))
            dev = m.gate.e_score_correction_bias.device
            m.load_counts = None if counts is None else counts.to(dev)
