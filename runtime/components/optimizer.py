"""The optimizer of the `optimizer` section: AdamW with decoupled weight decay on the matrices."""

import torch
from torch import nn

from generated.config import OptimizerConfig


def build_optimizer(model: nn.Module, optimizer: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW from OptimizerConfig. Weight decay goes to parameters with ndim >= 2 (the linear
    weights, expert matrices and the token embedding); biases and norm weights (ndim < 2) get
    none, and the router's correction bias is a buffer, never optimised. The parameter order
    (matrices first, then vectors, each in parameters() order) is what a single-file checkpoint's
    optimizer state is keyed by (runtime/checkpoint/dcp.py: load_full_into)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": optimizer.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (one pass over all tensors) exists on CPU and CUDA and is much faster than
    # the per-tensor loop; it is deterministic, so resumed runs stay bit-exact.
    return torch.optim.AdamW(
        groups,
        lr=optimizer.lr,
        betas=(optimizer.beta1, optimizer.beta2),
        eps=optimizer.eps,
        fused=True,
    )
