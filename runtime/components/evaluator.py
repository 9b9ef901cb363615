"""Validation: the mean main (next-token) loss over `evaluator.eval_iters` fixed batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from generated.config import EvaluatorConfig
from runtime.components.data.module import DataModule
from runtime.components.data.sampling import EvalBatchSampler
from runtime.components.loss import TrainingLoss
from runtime.distributed.utils import DistInfo, all_reduce_sum
from runtime.utils.faults import fault_point


class Evaluator:
    """Runs the validation batches of the `evaluator` section on every process and averages the
    main loss over all of them. `even`: every process runs as many forwards (a sharded model's
    collectives must pair up); the repeats a process needs for that are not counted."""

    def __init__(
        self,
        evaluator: EvaluatorConfig,
        data: DataModule,
        loss: TrainingLoss,
        dist: DistInfo,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager[object]],
        *,
        even: bool,
        main_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """`main_loss`: the main loss of a window when the model is not one module (a
        pipelined run's forward through its stages); None: `loss(model, window)`."""
        self.eval_iters = evaluator.eval_iters
        self.main_loss = main_loss
        self.data, self.loss, self.dist, self.device = data, loss, dist, device
        self.autocast, self.even = autocast, even

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> float:
        """Mean main loss of `model` over the validation batches (its train/eval mode kept)."""
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        loader = self.data.val_loader(self.eval_iters, even=self.even)
        counted = cast(EvalBatchSampler, loader.batch_sampler).counted
        for i, window in enumerate(loader):
            window = window.to(self.device, non_blocking=True)
            if self.main_loss is not None:
                main = self.main_loss(window)
            else:
                with self.autocast():
                    main = self.loss(model, window, step).main_loss
            if i < counted:
                totals += torch.stack([main.detach().double(), totals.new_ones(())])
            fault_point("eval")
        all_reduce_sum(totals, self.dist)
        model.train(was_training)
        return float(totals[0] / totals[1])
