"""DeepSeek-V3 on a parallel layout (runtime/distributed/layout.py): expert parallelism, activation
checkpointing and FSDP2 (`fully_shard` per block, then the whole model), all from torch.distributed.

  * dp_shard = expert_parallel = 1: nothing to shard (one process, or DDP around the whole model).
  * otherwise FSDP2. The non-expert weights of each block (attention, norms, router, shared
    experts, dense MLP) are sharded over the dp_shard x expert_parallel processes ("dp_shard_ep",
    a flattened mesh dimension) and replicated over dp_replicate (HSDP when that is > 1); the routed
    experts are first split over "ep" (runtime/distributed/expert_parallel.py), then sharded by FSDP
    over "dp_shard" (and replicated over "dp_replicate") when that group has more than one process.
    Embedding, head, norms and the MTP projections belong to the root `fully_shard`.
  * activation checkpointing (`none` | `selective` | `full`) turns on the blocks' own recomputation
    (model.py: Block.recompute, torch.utils.checkpoint per half block; state-dict names unchanged);
    it also applies without FSDP.

Mixed precision: `param_dtype` is the dtype FSDP gathers weights in, `reduce_dtype` that of the
gradient reduction; the sharded master weights and AdamW state stay float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from generated.config import DistributedConfig
from generated.names import ActivationCheckpointing
from runtime.distributed.expert_parallel import ExpertParallel
from runtime.distributed.layout import Layout, Parallelism, build_mesh, fsdp_mesh
from runtime.distributed.precision import DTYPES
from runtime.models.deepseek_v3.moe import MoE

if TYPE_CHECKING:
    from runtime.models.deepseek_v3.model import Block, Transformer


def blocks(model: Transformer) -> list[Block]:
    """Every transformer block, MTP blocks included."""
    # the ModuleLists hold Blocks and MTPModules (runtime/models/deepseek_v3/model.py); iterating one yields nn.Module
    from runtime.models.deepseek_v3.model import Block, MTPModule

    # a pipeline stage's process holds only some of them (the others are pipeline.Absent)
    held = [b for b in model.layers if isinstance(b, Block)]
    return held + [m.block for m in model.mtp if isinstance(m, MTPModule)]


def apply_activation_checkpointing(model: Transformer, mode: str) -> int:
    """Recompute the blocks `mode` selects (full: all, selective: every second one); returns how
    many."""
    if mode == ActivationCheckpointing.NONE:
        return 0
    chosen = [
        block
        for i, block in enumerate(blocks(model))
        if mode == ActivationCheckpointing.FULL or i % 2 == 0
    ]
    for block in chosen:
        block.recompute = True
    return len(chosen)


def parallelize(
    model: Transformer, dist_cfg: DistributedConfig, layout: Layout, device: torch.device
) -> Parallelism:
    """Expert parallelism, activation checkpointing and FSDP2 on `model`, in place (the model
    keeps its class and its state-dict names). Call before the optimizer is built."""
    apply_activation_checkpointing(model, dist_cfg.activation_checkpointing)
    if not layout.sharded:
        return Parallelism(layout)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = build_mesh(layout, device.type)
    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES.get(dist_cfg.param_dtype), reduce_dtype=DTYPES.get(dist_cfg.reduce_dtype)
    )
    dense_mesh = fsdp_mesh(mesh, layout.dp_replicate, "dp_shard_ep")
    experts_dp = layout.dp_replicate * layout.dp_shard > 1
    expert_mesh = fsdp_mesh(mesh, layout.dp_replicate, "dp_shard") if experts_dp else None
    reshard = dist_cfg.reshard_after_forward
    for block in blocks(model):
        ignored: set[nn.Parameter] = set()
        if isinstance(block.ffn, MoE):
            experts = block.ffn.experts
            if layout.expert_parallel > 1:
                ep_mesh = mesh["ep"]
                for name in ("w13", "w2"):
                    full = getattr(experts, name)
                    # every process holds the same whole weight (or a meta one): keep its own
                    # experts, no scatter
                    sharded = distribute_tensor(
                        full.detach(), ep_mesh, [Shard(0)], src_data_rank=None
                    )
                    setattr(experts, name, nn.Parameter(sharded))
                ep = ExpertParallel(ep_mesh.get_group(), block.ffn.n_experts)
                block.ffn.expert_parallel = ep
                experts.local_weights = ep.local_weights
                if expert_mesh is not None:
                    # FSDP shards dim 1 (the expert dim 0 is already split over "ep"), as
                    # torchtitan does when both would otherwise cut dim 0
                    fully_shard(
                        experts,
                        mesh=expert_mesh,
                        reshard_after_forward=reshard,
                        mp_policy=mp,
                        shard_placement_fn=lambda param: Shard(1),
                    )
                else:  # each process owns its experts outright: nothing to gather or reduce
                    ignored = {experts.w13, experts.w2}
        fully_shard(
            block,
            mesh=dense_mesh,
            reshard_after_forward=reshard,
            mp_policy=mp,
            ignored_params=ignored or None,
        )
    if layout.pipelined:
        # a pipeline stage never calls the model's own forward: the embedding, final norm, head
        # and MTP modules it holds are units of their own (on the V schedules one process's two
        # stages share the embedding, which no single root could own)
        from runtime.models.deepseek_v3.pipeline import Absent

        for part in (model.embed, model.norm, model.head, *model.mtp):
            if not isinstance(part, Absent):
                fully_shard(part, mesh=dense_mesh, reshard_after_forward=False, mp_policy=mp)
        return Parallelism(layout, mesh)
    # the root: embedding, head, final norms, MTP projections; gathered for the whole step
    fully_shard(model, mesh=dense_mesh, reshard_after_forward=False, mp_policy=mp)
    return Parallelism(layout, mesh)
