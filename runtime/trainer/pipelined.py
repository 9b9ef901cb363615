"""The training step, evaluation and sampling of a pipelined run (system.distributed.
pipeline_parallel > 1), which the Trainer uses in place of its own when the layout has a pipeline.

Every process of a pipeline reads the same micro-batches (its data-parallel rank's); the schedule
(runtime/distributed/pipeline.py) runs them through this process's stages
(runtime/models/<family>/pipeline.py), each micro-batch's loss divided by the step's count as in
one process. After the backward: gradients averaged over the stage's data-parallel processes, the
embedding's two copies summed, one global norm over the pipeline for clipping. The metrics are
the same sums as one process's, gathered from the stages that computed them, so every process
decides alike on a non-finite loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from generated.config import Config
from generated.names import PipelineSchedule
from runtime.components.loss import TrainingLoss
from runtime.distributed.compile import compile_in_place
from runtime.distributed.layout import Parallelism
from runtime.distributed.pipeline import (
    V_SCHEDULES,
    Pipeline,
    average_over,
    clip_pipeline_grad_norm,
    pipeline_groups,
    sum_over,
)
from runtime.models.deepseek_v3.pipeline import combine
from runtime.models.spec import ModelSpec


class PipelinedSteps:
    """A pipelined run's step, evaluation and forward (module doc)."""

    def __init__(
        self,
        cfg: Config,
        spec: ModelSpec,
        model: nn.Module,
        parallel: Parallelism,
        loss: TrainingLoss,
        *,
        rank: int,
        device: torch.device,
        eos_id: int | None,
        autocast: Callable[[], contextlib.AbstractContextManager[object]],
    ) -> None:
        dist_cfg = cfg.system.distributed
        layout = parallel.layout
        assert spec.stage_modules is not None and parallel.stages is not None  # build_model's
        per_rank = dist_cfg.pipeline_stages_per_rank
        assert per_rank is not None  # a derived default
        self.num_stages = layout.pipeline_parallel * per_rank
        v_shaped = PipelineSchedule(dist_cfg.pipeline_schedule) in V_SCHEDULES
        self.groups = pipeline_groups(layout, rank, v_shaped)
        self.model, self.cfg, self.loss, self.device = model, cfg, loss, device
        self.spec = spec
        self.sharded = layout.sharded
        self.autocast = autocast
        self.modules = spec.stage_modules(model, parallel.stages, self.num_stages, cfg.moe, eos_id)
        self.mtp_weight, self.scale = 0.0, 1.0
        # torch.compile per block (the schedule calls the stages' parts, not one module)
        blocks = [b for m in self.modules.values() for b in cast(Any, m).blocks]
        self.compiled = compile_in_place(blocks, cfg.system.compile)
        self.pipeline = Pipeline(
            self.modules,
            num_stages=self.num_stages,
            schedule=dist_cfg.pipeline_schedule,
            groups=self.groups,
            device=device,
            loss_fn=combine(lambda: self.mtp_weight, lambda: self.scale),
        )
        holds_first, holds_last = self.pipeline.holds_first, self.pipeline.holds_last
        embed = cast(Any, model).embed
        self.tied = [embed.weight] if self.groups.tie_group is not None and (
            holds_first or holds_last
        ) else []  # fmt: skip
        # the squared norm counts each weight once: the last stage's copy of the embedding not
        self.norm_params = [
            p for p in model.parameters()
            if not (holds_last and not holds_first and self.tied and p is embed.weight)
        ]  # fmt: skip
        self.depth = cfg.model.mtp_depth

    def whole_model_names(self) -> list[str]:
        """The parameter names of the whole (unpipelined) model, in order."""
        with torch.device("meta"):
            whole = self.spec.build(self.cfg.model, self.cfg.moe)
        return [name for name, _ in whole.named_parameters()]

    def gather_rows(self, rows: list[Any]) -> list[Any]:
        """Every process of the pipeline's routing-statistics rows (balancer.stats' `gather`)."""
        everyone: list[Any] = [None] * self.groups.pp_size
        dist.all_gather_object(everyone, rows, group=self.groups.pp_group)
        return [row for part in everyone for row in part]

    def sum_loads(self, loads: torch.Tensor) -> None:
        """The balancer's loads, summed over the processes holding the same layers."""
        if self.groups.dp_group is not None:
            dist.all_reduce(loads, group=self.groups.dp_group)

    def _gather_sums(self, n: int) -> list[float]:
        """[main, aux, z, *mtp] summed over this step's micro-batches and the pipeline's stages,
        averaged over micro-batches and data-parallel processes (aux summed and z averaged over
        the MoE layers, as TrainingLoss reports them)."""
        D = self.depth
        local = torch.zeros(3 + D, dtype=torch.float64)
        for s, module in self.modules.items():
            m = cast(Any, module)
            local[1] += m.aux_sum
            local[2] += m.z_sum
            if s == self.num_stages - 1 and m.loss_sums.numel():
                local[0] += m.loss_sums[0]
                local[3:] += m.loss_sums[1:]
        local = local.to(self.device)
        dist.all_reduce(local, group=self.groups.pp_group)
        if self.groups.dp_group is not None:
            dist.all_reduce(local, group=self.groups.dp_group)
        means = (local / (n * self.groups.dp_size)).tolist()
        n_moe = cast(Any, next(iter(self.modules.values()))).n_moe_layers
        means[2] /= n_moe
        return means

    def _reset(self) -> None:
        for module in self.modules.values():
            cast(Any, module).reset_terms()

    def forward_backward(self, step: int, micro_batches: Sequence[torch.Tensor]) -> dict[str, Any]:
        """One step's forward and backward through the pipeline, gradients averaged and the
        embedding's copies summed; returns the step's loss metrics (every process the same)."""
        n = len(micro_batches)
        self.scale, self.mtp_weight = 1.0 / n, self.loss.mtp_weight(step)
        for module in self.modules.values():
            cast(Any, module).scale = self.scale
        self._reset()
        windows = torch.cat([w.to(self.device) for w in micro_batches])  # (n * B, W)
        with self._autocast():
            self.pipeline.step(windows, n, self._probing)
        if not self.sharded:  # FSDP2 reduces the gradients of a sharded stage itself
            params = list(self.model.parameters())
            average_over(params, self.groups.dp_group, self.groups.dp_size)
        sum_over(self.tied, self.groups.tie_group)
        main, aux, z, *mtp = self._gather_sums(n)
        weight = self.mtp_weight if self.depth else 0.0
        loss = main + self.loss.aux_loss_weight * aux + self.loss.z_loss_weight * z
        if mtp:
            loss += weight * sum(mtp) / len(mtp)
        return {
            "loss": loss,
            "main_loss": main,
            "aux_loss": aux,
            "z_loss": z,
            **{f"mtp_loss_{k + 1}": v for k, v in enumerate(mtp)},
            "mtp_weight": float(weight),
        }

    @contextlib.contextmanager
    def _probing(self) -> Iterator[None]:
        """The model in eval mode (MoE layers count no loads) and the stages' sums left alone,
        while torch infers the stages' shapes."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)
            self._reset()

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        return self.autocast()

    def clip(self, max_norm: float) -> float:
        """Clip to one global norm over the pipeline's stages; the norm."""
        return float(clip_pipeline_grad_norm(self.norm_params, max_norm, self.groups.dp_size))

    # ---- forward only

    @torch.no_grad()
    def main_loss(self, window: torch.Tensor) -> torch.Tensor:
        """The main (next-token) loss of a validation window (B, W), on every process."""
        B, W = window.shape
        T = W - 1 - self.depth
        window = window.to(self.device)
        self._reset()

        def call(module: nn.Module, stage: int, x: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return cast(torch.Tensor, module(x, tokens=window))

        dim = self.cfg.model.dim
        out = self.pipeline.forward(window, (B, T, dim), (2 + self.depth,), call)
        self._reset()
        return out[0]

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab) of `tokens` (B, T), on every process (no cache)."""
        B, T = tokens.shape
        tokens = tokens.to(self.device)

        def call(module: nn.Module, stage: int, x: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return cast(torch.Tensor, cast(Any, module).logits(x, tokens))

        dim, vocab = self.cfg.model.dim, self.cfg.model.vocab_size
        return self.pipeline.forward(tokens, (B, T, dim), (B, T, vocab), call)


class PipelinedLM(nn.Module):
    """A pipelined model as `generate` calls it: forward(tokens) -> an object with `.logits`,
    and `.config` (every process of the pipeline runs it together)."""

    def __init__(self, steps: PipelinedSteps) -> None:
        super().__init__()
        self._steps = [steps]
        self.config = steps.cfg.model

    def parameters(self, recurse: bool = True) -> Any:  # generate() reads the device here
        return self._steps[0].model.parameters(recurse)

    def forward(self, tokens: torch.Tensor, **_: Any) -> Any:
        logits = self._steps[0].logits(tokens)
        return type("Out", (), {"logits": logits})()
