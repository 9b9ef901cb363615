"""The training loss: the model's outputs weighed by the moe and mtp sections.

loss = main + aux_loss_weight * sum(aux) + z_loss_weight * mean(z) + lambda(step) * mean(mtp), where
main and mtp are next-token / depth-k cross-entropies, the balance terms are summed over MoE layers
(DeepSeek's alpha is per layer), the z terms averaged, and lambda follows the mtp section's
schedule (mtp_loss_weight, then mtp_loss_weight_final from mtp_loss_weight_until on, times the
linear warm-up over warmup_steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generated.config import MoETrainingConfig, MTPTrainingConfig

if TYPE_CHECKING:  # the output of a model family's forward
    from runtime.models.deepseek_v3.model import ModelOutput


def mtp_weight_at(mtp: MTPTrainingConfig, step: int) -> float:
    """lambda at optimizer step `step`: mtp_loss_weight (mtp_loss_weight_final from
    mtp_loss_weight_until on), times the warm-up ramp. `deepseek-moe schedule` prints this too."""
    weight, until, final = mtp.mtp_loss_weight, mtp.mtp_loss_weight_until, mtp.mtp_loss_weight_final
    warmup = mtp.warmup_steps
    w = weight if until is None or step < until else final
    return w if warmup == 0 else w * min(1.0, step / warmup)


@dataclass
class LossOutput:
    loss: Tensor  # scalar for backward: main + mtp_weight * mean(mtp) + aux_w * aux + z_w * z
    main_loss: Tensor  # next-token cross-entropy
    mtp_losses: list[Tensor]  # cross-entropy per MTP depth
    aux_loss: Tensor  # unweighted, summed over MoE layers, as DeepSeek does (0 without MoE layers)
    z_loss: Tensor  # unweighted, mean over MoE layers
    mtp_weight: float  # the scheduled weight used (0 without MTP modules)


class TrainingLoss:
    """Combines a ModelOutput into the loss of optimizer step `step`."""

    def __init__(
        self, moe: MoETrainingConfig, mtp: MTPTrainingConfig, document_eos: int | None = None
    ):
        """`document_eos`: the end-of-document id when attention is masked per document
        (`data.document_mask`), else None."""
        self.document_eos = document_eos
        self.aux_loss_weight = moe.aux_loss_weight
        self.z_loss_weight = moe.z_loss_weight
        self.mtp = mtp

    def mtp_weight(self, step: int) -> float:
        """lambda at `step` (mtp_weight_at)."""
        return mtp_weight_at(self.mtp, step)

    def __call__(self, model: nn.Module, window: Tensor, step: int) -> LossOutput:
        """window (B, T + 1 + D) of a model with D MTP modules (or a DDP / compile wrapper of it):
        inputs window[:, :-1], targets window[:, 1:]."""
        masks = {} if self.document_eos is None else {"eos_id": self.document_eos}
        out = model(window[:, :-1], mtp=True, **masks)
        return self.combine(out, window[:, 1:], step)

    def combine(self, out: ModelOutput, targets: Tensor, step: int) -> LossOutput:
        """targets (B, T + D): the main logits predict targets[:, :T], depth k targets[:, k:T+k]."""
        T = out.logits.shape[1]
        main_loss = _ce(out.logits, targets[:, :T])
        mtp_losses = [
            _ce(logits, targets[:, k : T + k]) for k, logits in enumerate(out.mtp_logits, start=1)
        ]
        zero = main_loss.new_zeros(())
        aux = torch.stack(out.aux).sum() if out.aux else zero
        z = torch.stack(out.z).mean() if out.z else zero
        loss = main_loss + self.aux_loss_weight * aux + self.z_loss_weight * z
        w = self.mtp_weight(step) if mtp_losses else 0.0
        if mtp_losses:
            loss = loss + w * torch.stack(mtp_losses).mean()
        return LossOutput(loss, main_loss, mtp_losses, aux, z, w)


def _ce(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
