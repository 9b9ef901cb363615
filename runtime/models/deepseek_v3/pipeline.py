"""DeepSeek-V3 cut into pipeline stages (system.distributed.pipeline_parallel).

Each process builds the whole model on the meta device, then keeps only what its stages use
(`keep_stages`): its blocks, the embedding on the first stage, the final norm, head and MTP
modules on the last. What it drops becomes `Absent`, so every kept weight keeps its name
(`layers.7.attn.wq.weight`): checkpoints are the one model's, whatever the layout, and DCP
reshards them between pipelined and unpipelined runs. Weights are initialised per name
(Transformer.init_weights), so a pruned model holds exactly the numbers of the whole one.

The MTP modules embed tokens t + k, so the last stage needs the embedding too: when the first
and last stages are on different processes the last holds a copy under the same name, and the
trainer sums the two gradients before each update (runtime/distributed/pipeline.py), so both
copies stay equal; on the V schedules both stages are on one process and share the module.

A stage's forward takes the previous stage's hidden state (the first stage: the tokens) and, as
a keyword every stage gets, the micro-batch's whole window of tokens (document masks, MTP). The
balance and z terms of a stage's MoE layers are added to the gradient where they arise
(`AddLossGradient`), so the update is that of one process's loss
  main + aux_w * sum(aux) + z_w * mean(z) + lambda * mean(mtp)
without sending them down the pipeline; their values are kept for the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.models.deepseek_v3.model import Block, MTPModule, Transformer, document_ids


class Absent(nn.Module):
    """A part of the model that lives in another pipeline stage's process."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # never called
        raise RuntimeError("this part of the model is held by another pipeline stage")


def keep_stages(model: Transformer, layers: list[range], first: bool, last: bool) -> None:
    """Prune `model` in place to the blocks in `layers` (this process's stages), the embedding
    if it holds the first stage (or the last: MTP embeds), and the final norm, head and MTP
    modules if it holds the last."""
    # sources load only the weights it holds (interop/sources.py)
    cast(Any, model).pipeline_part = True
    kept = {i for r in layers for i in r}
    for i in range(len(model.layers)):
        if i not in kept:
            model.layers[i] = Absent()
    if not (first or (last and len(model.mtp) > 0)):
        model.embed = cast(nn.Embedding, Absent())
    if not last:
        model.norm = cast(Any, Absent())
        model.head = cast(nn.Linear, Absent())
        for k in range(len(model.mtp)):
            model.mtp[k] = Absent()


class AddLossGradient(torch.autograd.Function):
    """Identity on `h` whose backward also starts the backward of `loss` (Megatron's
    MoEAuxLossAutoScaler): a stage's balance and z terms reach their routers' gradients without
    travelling down the pipeline."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, loss: Tensor) -> Tensor:
        ctx.save_for_backward(loss)
        # a copy, not `h` itself: an input returned as-is is a view, which the zero-bubble
        # schedules' split backward cannot detach in place
        return h.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


class StageModule(nn.Module):
    """One pipeline stage of a pruned Transformer: its blocks `layers`; the embedding when
    `first`; the head, the MTP modules and the losses when `last`.

    The last stage returns a vector (1 + 1 + D,): the main loss, its own weighted balance and z
    terms, and the MTP depth losses (the schedule's loss_fn weighs them: `combine`). Every stage
    adds its MoE layers' terms, weighted and divided by `scale` (the micro-batches of a step),
    to the gradient, and sums their values into `aux_sum` / `z_sum` for the metrics."""

    def __init__(
        self,
        model: Transformer,
        layers: range,
        *,
        first: bool,
        last: bool,
        aux_weight: float,
        z_weight: float,
        n_moe_layers: int,
        eos_id: int | None,
    ) -> None:
        super().__init__()
        # the pruned model itself is not a submodule (its parameters are the process's); the parts
        # this stage runs are, so the zero-bubble schedules' weight-gradient pass finds them all
        self._model = [model]
        self.blocks = nn.ModuleList([cast(Block, model.layers[i]) for i in layers])
        if first or (last and model.config.mtp_depth > 0):
            self.embed = model.embed
        if last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        self.first, self.last = first, last
        self.aux_weight, self.z_weight = aux_weight, z_weight
        self.n_moe_layers = max(1, n_moe_layers)
        self.eos_id = eos_id
        self.scale = 1.0  # 1 / micro-batches of the step (set before each step)
        self.aux_sum = torch.zeros(())
        self.z_sum = torch.zeros(())
        self.loss_sums = torch.zeros(0)  # last stage: main and MTP depth losses, summed

    @property
    def model(self) -> Transformer:
        return self._model[0]

    def reset_terms(self) -> None:
        """Forget the values summed for the metrics (before each step or evaluation)."""
        self.aux_sum = torch.zeros(())
        self.z_sum = torch.zeros(())
        self.loss_sums = torch.zeros(0)

    def _weighted(self, terms: list[tuple[Tensor, Tensor]]) -> Tensor | None:
        if not terms:
            return None
        aux = torch.stack([a for a, _ in terms]).sum()
        z = torch.stack([z for _, z in terms]).sum()
        self.aux_sum = self.aux_sum + aux.detach().double().cpu()
        self.z_sum = self.z_sum + z.detach().double().cpu()
        return self.aux_weight * aux + self.z_weight * z / self.n_moe_layers

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        """x: the window (B, T + 1 + D) on the first stage, else the hidden state (B, T, C);
        tokens: the micro-batch's window (B, T + 1 + D), inputs window[:, :-1] and targets
        window[:, 1:] as in TrainingLoss -> the hidden state (B, T, C), or on the last stage the
        loss vector."""
        model = self.model
        D = model.config.mtp_depth
        T = tokens.shape[1] - 1 - D
        docs = document_ids(tokens, self.eos_id) if self.eos_id is not None else None
        main_docs = None if docs is None else docs[:, :T]
        h = model.embed(tokens[:, :T]) if self.first else x  # (B, T, C)
        terms: list[tuple[Tensor, Tensor]] = []
        for block in self.blocks:
            h, t = block(h, model.rope_cos, model.rope_sin, None, main_docs)
            terms += t
        weighted = self._weighted(terms)
        if not self.last:
            if weighted is not None:
                h = AddLossGradient.apply(h, weighted * self.scale)
            return h
        h = model.norm(h)
        targets = tokens[:, 1:]  # (B, T + D - 1)
        main = _ce(model.head(h), targets[:, :T])
        mtp_losses = []
        mtp_terms: list[tuple[Tensor, Tensor]] = []
        for k, module in enumerate(cast(list[MTPModule], list(model.mtp)[:D]), start=1):
            emb = model.embed(tokens[:, k : T + k])
            h, t = module(h, emb, model.rope_cos, model.rope_sin, main_docs)
            mtp_terms += t
            h = module.norm(h)
            mtp_losses.append(_ce(model.head(h), targets[:, k : T + k]))
        mtp_weighted = self._weighted(mtp_terms)
        parts = torch.stack([main, *mtp_losses]).detach().double().cpu()
        self.loss_sums = parts if self.loss_sums.numel() == 0 else self.loss_sums + parts
        own = [w for w in (weighted, mtp_weighted) if w is not None]
        extra = torch.stack(own).sum() if own else main.new_zeros(())
        return torch.stack([main, extra, *mtp_losses])

    def logits(self, x: Tensor, tokens: Tensor) -> Tensor:
        """Sampling (no cache, no losses): x the tokens (B, T) on the first stage, else the
        hidden state -> the hidden state, or on the last stage the logits (B, T, vocab)."""
        model = self.model
        h = model.embed(tokens) if self.first else x
        for block in self.blocks:
            h, _ = block(h, model.rope_cos, model.rope_sin)
        return model.head(model.norm(h)) if self.last else h


def _ce(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def combine(mtp_weight: Callable[[], float], scale: Callable[[], float]) -> Callable[..., Tensor]:
    """The pipeline schedule's loss_fn: the last stage's vector weighed into one micro-batch's
    share of the step's loss, (main + its own weighted terms + lambda * mean(mtp)) * scale."""

    def loss_fn(output: Tensor, target: Any = None) -> Tensor:
        loss = output[0] + output[1]
        if output.shape[0] > 2:
            loss = loss + mtp_weight() * output[2:].mean()
        return loss * scale()

    return loss_fn


def held_stages(
    n_layers: int, pipeline_parallel: int, stages_per_rank: int, split: list[int], v_shaped: bool,
    pp_rank: int,
) -> dict[int, range]:  # fmt: skip
    """Stage index -> its layers, for the stages pipeline rank `pp_rank` holds."""
    from runtime.distributed.layout import stage_layers, stage_ranks

    stages = pipeline_parallel * stages_per_rank
    layers = stage_layers(n_layers, stages, split)
    owner = stage_ranks(v_shaped, pipeline_parallel, stages_per_rank)
    return {s: layers[s] for s in range(stages) if owner[s] == pp_rank}
