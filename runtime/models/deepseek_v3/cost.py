"""What a DeepSeek-V3 config costs before anything is launched (the numbers behind `plan`), from
the `model`, `training` and `system.distributed` sections alone (imports no torch, reads no weights):

  * parameters, total and activated per token, main model and MTP modules apart. Counted from the
    same shapes model.py builds (tests check them against a live model exactly);
    "activated" counts every weight a token's forward touches: embedding row, attention, dense MLPs,
    router, shared experts and top_k of the routed experts (the output head is counted whole).
  * training FLOPs per token: 6 x activated matmul weights (forward 2, backward 4; the embedding
    lookup is no matmul) plus causal attention, 6 x n_heads x (qk_head_dim + v_head_dim) x seq_len / 2
    per layer (queries see half the keys on average), as in the PaLM / Chinchilla accounting.
  * memory per process for the layout: fp32 weights (4 bytes), fp32 gradients (4) and AdamW's two
    moments (8). FSDP shards the non-expert weights over dp_shard x expert_parallel processes and the
    experts over expert_parallel (their groups) x dp_shard; dp_replicate holds copies. Plus an
    activation ESTIMATE for batch_size x seq_len in the autocast dtype (what the backward keeps per
    block, divided down by activation checkpointing) and the fp32 logits of the head(s). An estimate,
    not a measurement: allocator slack, gathered FSDP blocks and communication buffers come on top.

The plan warns when the estimate does not fit the given GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from generated import PATH
from generated.config import Config, ModelConfig
from generated.names import ActivationCheckpointing, Dtype
from runtime.distributed.layout import Layout, layout_for

GIB = 1024**3
DTYPE_BYTES: dict[str, int] = {Dtype.FLOAT32: 4, Dtype.BFLOAT16: 2, Dtype.FLOAT16: 2}


@dataclass
class ParamCounts:
    total: int
    active: int  # per token
    experts: int  # routed expert weights (sharded by expert parallelism)
    embedding: int  # embedding table (not a matmul)

    def __add__(self, other: ParamCounts) -> ParamCounts:
        return ParamCounts(
            self.total + other.total,
            self.active + other.active,
            self.experts + other.experts,
            self.embedding + other.embedding,
        )


def _attention(m: ModelConfig) -> int:
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank == 0:
        q = m.dim * m.n_heads * qk
    else:
        q = m.dim * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * m.n_heads * qk
    kv = m.dim * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
    kv += m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + m.n_heads * m.v_head_dim * m.dim


def _block(m: ModelConfig, layer_id: int) -> ParamCounts:
    """One Block: two norms, MLA, then a dense SwiGLU or DeepSeekMoE."""
    base = 2 * m.dim + _attention(m)
    if layer_id < m.first_k_dense:
        mlp = 3 * m.dim * m.inter_dim
        return ParamCounts(base + mlp, base + mlp, 0, 0)
    expert = 3 * m.dim * m.moe_inter_dim
    router = m.n_routed_experts * m.dim
    shared = m.n_shared_experts * expert
    routed = m.n_routed_experts * expert
    return ParamCounts(
        base + router + shared + routed, base + router + shared + m.top_k * expert, routed, 0
    )


def count_params(m: ModelConfig) -> tuple[ParamCounts, ParamCounts]:
    """(main model, MTP modules) parameter counts of a ModelConfig."""
    emb, head = m.vocab_size * m.dim, m.vocab_size * m.dim
    main = ParamCounts(emb + head + m.dim, m.dim + head + m.dim, 0, emb)  # one embedding row active
    for i in range(m.n_layers):
        main = main + _block(m, i)
    mtp = ParamCounts(0, 0, 0, 0)
    for k in range(m.mtp_depth):
        own = 3 * m.dim + 2 * m.dim * m.dim  # enorm, hnorm, norm, eh_proj
        mtp = mtp + ParamCounts(own, own, 0, 0) + _block(m, m.n_layers + k)
    return main, mtp


def flops_per_token(m: ModelConfig, seq_len: int, counts: ParamCounts) -> float:
    """Training FLOPs per token (forward + backward) of the given (activated) counts over
    `layers` attention layers."""
    matmul = counts.active - m.dim  # the embedding row is a lookup
    return 6.0 * matmul


def attention_flops_per_token(m: ModelConfig, seq_len: int, layers: int) -> float:
    return (
        6.0
        * layers
        * m.n_heads
        * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
        * (seq_len / 2)
    )


def activation_bytes(cfg: Config, layout: Layout) -> float:
    """Rough bytes the backward keeps per process for one micro-batch (see the module doc)."""
    m, t = cfg.model, cfg.training
    tokens = t.batch_size * t.seq_len
    b = DTYPE_BYTES[str(cfg.system.device.dtype)]
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    attn = (
        2 * m.dim
        + m.kv_lora_rank
        + m.qk_rope_head_dim
        + m.n_heads * (2 * qk + 2 * m.v_head_dim)
        + (m.q_lora_rank or 0)
    )
    moe = m.top_k * (m.dim + 4 * m.moe_inter_dim) + m.n_shared_experts * 3 * m.moe_inter_dim
    dense = 3 * m.inter_dim
    halves = []  # per block: (attention half, feed-forward half), each with its norm
    for i in range(m.n_layers + m.mtp_depth):
        ffn = dense if i < m.first_k_dense else moe
        halves.append((tokens * b * (attn + m.dim), tokens * b * (ffn + m.dim)))
    mode = cfg.system.distributed.activation_checkpointing
    kept = 0.0
    for i, (attention, feed_forward) in enumerate(halves):
        recomputed = mode == ActivationCheckpointing.FULL or (
            mode == ActivationCheckpointing.SELECTIVE and i % 2 == 0
        )
        # a recomputed block keeps only the inputs of its two halves
        kept += 2 * tokens * b * m.dim if recomputed else attention + feed_forward
    if mode != ActivationCheckpointing.NONE:
        kept += max(max(h) for h in halves)  # one half recomputed at a time
    logits = tokens * m.vocab_size * 4 * 2 * (1 + m.mtp_depth)  # fp32 logits and their gradient
    return kept + logits


def plan(cfg: Config, world: int, gpu_memory_gib: float) -> dict[str, Any]:
    m = cfg.model
    main, mtp = count_params(m)
    layout, problem = layout_for(cfg.system.distributed, world)
    total = main + mtp
    dense = total.total - total.experts
    if layout.sharded:
        shard = layout.dp_shard * layout.expert_parallel
        per_proc_params = dense / shard + total.experts / shard
    else:
        per_proc_params = float(total.total)
    weights = per_proc_params * 4
    grads = per_proc_params * 4
    optim = per_proc_params * 8
    acts = activation_bytes(cfg, layout)
    attention = attention_flops_per_token(m, cfg.training.seq_len, m.n_layers)
    mtp_attention = attention_flops_per_token(m, cfg.training.seq_len, m.mtp_depth)
    result: dict[str, Any] = {
        "params": {
            "main": {"total": main.total, "active": main.active},
            "mtp": {"total": mtp.total, "active": mtp.active},
            "total": total.total,
            "active": total.active,
        },
        "flops_per_token": {
            "main": flops_per_token(m, cfg.training.seq_len, main) + attention,
            "mtp": 6.0 * mtp.active + mtp_attention,
        },
        "layout": vars(layout),
        "memory_per_process_bytes": {
            "weights": weights,
            "grads": grads,
            "optimizer": optim,
            "activations_estimate": acts,
        },
        "gpu_memory_gib": gpu_memory_gib,
        "warnings": [],
    }
    need = weights + grads + optim + acts
    result["memory_per_process_bytes"]["total"] = need
    if problem:
        result["warnings"].append(f"layout: {problem}")
    if need > gpu_memory_gib * GIB:
        result["warnings"].append(
            f"does not fit: about {need / GIB:,.1f} GiB per process needed, {gpu_memory_gib:g} GiB "
            f"available; raise {PATH.system.distributed.dp_shard} or "
            f"{PATH.system.distributed.expert_parallel} (more processes), set "
            f"{PATH.system.distributed.activation_checkpointing}, or lower "
            f"{PATH.training.batch_size} / {PATH.training.seq_len}"
        )
    return result
