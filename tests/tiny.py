"""The debug model flavour the unit tests build on: tiny dimensions that run in milliseconds on CPU.

Each test states only what it changes: `debug_model_config(n_layers=3, mtp_depth=1)`.
"""

import torch

from generated.config import ModelConfig, MoETrainingConfig, MTPTrainingConfig
from runtime.components.loss import TrainingLoss
from runtime.models.deepseek_v3.model import Transformer
from runtime.models.deepseek_v3.moe import RoutingKnobs

DEBUG_MODEL = dict(
    vocab_size=64,
    dim=32,
    inter_dim=64,
    moe_inter_dim=16,
    n_layers=2,
    first_k_dense=1,
    n_heads=2,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_seq_len=64,
    n_routed_experts=4,
    top_k=2,
    mtp_depth=0,
)


def debug_model_config(**overrides):
    return ModelConfig(**{**DEBUG_MODEL, **overrides})


def debug_model(moe=None, **overrides):
    """A seeded Transformer of the debug flavour; `moe` (a MoETrainingConfig) gives its routing knobs."""
    torch.manual_seed(0)
    knobs = RoutingKnobs.from_config(moe) if moe is not None else None
    return Transformer(debug_model_config(**overrides), knobs)


def training_loss(moe=None, mtp=None):
    """The trainer's loss for these sections (spec defaults where None)."""
    return TrainingLoss(moe or MoETrainingConfig(), mtp or MTPTrainingConfig())


# The same kind of model for end-to-end trainer tests, as command-line flags.
TINY_RUN_FLAGS = [
    "--model.dim", "32", "--model.inter_dim", "64", "--model.moe_inter_dim", "32", "--model.n_layers", "2",
    "--model.n_heads", "2", "--model.kv_lora_rank", "16", "--model.qk_nope_head_dim", "16",
    "--model.qk_rope_head_dim", "8", "--model.v_head_dim", "16", "--model.n_routed_experts", "4",
    "--model.max_seq_len", "32", "--training.seq_len", "16", "--training.batch_size", "2",
    "--sample.max_new_tokens", "8",
]  # fmt: skip
