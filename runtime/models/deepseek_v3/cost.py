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

With system.distributed.pipeline_parallel P > 1 (`pipeline_plan`) the layers are cut into
S = P x v stages (v = pipeline_stages_per_rank; layout.stage_layers, pipeline_split) held by the
pipeline ranks as layout.stage_ranks places them (looped, or V-shaped for zbv / dualpipev). A stage
holds its blocks; stage 0 the embedding; the last stage the final norm, the head, the MTP modules
and, when it is on another rank than stage 0 and there are MTP modules, a copy of the embedding (on
the V schedules both are on rank 0, which holds the embedding once). A rank's weights, gradients and
AdamW state are those of its stages, sharded as above by dp_shard x expert_parallel (the processes
of one stage). Its activations are, per stage, the micro-batches the schedule keeps in flight there
times what one micro-batch keeps in that stage (its blocks; the last stage also the fp32 logits of
the head(s)), plus once per rank what only one backward at a time needs (the recomputed half block,
the logits' gradient). m = gradient_accumulation_steps / (world / P) micro-batches per step (the
full batch; a batch-size ramp runs fewer). In flight at stage s (rank r, at the rank's peak):

  gpipe             m (all forwards before any backward)
  1f1b              min(m, P - s): rank 0 keeps P, the last rank 1
  interleaved_1f1b  per rank min(m v, (v - 1) P + 2 (P - r) - 1) stage micro-batches: Megatron-LM's
                    warm-up forwards plus one (for rank 0 this is Korthikanti et al. 2022's
                    (1 + (P - 1) / (P v)) x 1F1B's P micro-batches of a rank's layers), shared out
                    over the rank's stages in the schedule's forward order (P micro-batches of its
                    first stage, P of its second, ..., then the next P)
  zbv               min(m, S - s - 1) for the first leg (s < P), min(m, S - s) for the second: 2P
                    per rank (P of a rank's layers), as 1F1B's rank 0 (ZB-V, Qi et al. 2024)
  dualpipev         min(m, S - s): 2P + 1 per rank, the "PP + 1" of DualPipe's table (DeepSeek-V3
                    report 3.2.1, Table 2; PP = S stages of the V)

Bubble fraction of a step, idle time / (idle time + m (F + B + W)), with F, B and W the times of a
rank's forward, backward for the inputs and backward for the weights of one micro-batch over all of
its stages (a stage's are 1/v of them), taken as F : B : W = 1 : 1 : 1 (a backward costs two
forwards, half for each gradient):

  gpipe, 1f1b       (P - 1)(F + B + W)                          -> (P - 1) / (m + P - 1)
  interleaved_1f1b  (P - 1)(F + B + W) / v                      -> (P - 1) / (v m + P - 1)
  zbv               (P - 1)(F + B - 2W) / 2, not below 0 (ZB1P's (PP - 1)(F + B - 2W) on stages
                    of half a rank)                             -> 0 at 1 : 1 : 1
  dualpipev         (S / 2 - 1)(F&B + B - 3W) / 2 with F&B = F + B + W (a forward and a backward
                    chunk overlapped: their compute adds up; Table 2's formula on stages of half
                    a rank)                                     -> (P - 1) / (6 m + P - 1)

Activation checkpointing is estimated as the runtime does it (`selective`: every second block of
the whole model, MTP blocks counted after the main ones). The report's own selective recomputation
(3.2.3: every RMSNorm and the MLA up-projections recomputed in every block, everything else kept) is
a different trade: with `selective` the pipeline part also gives the heaviest rank under it
(`paper_recomputation`). Nor does the estimate model the report's other savings (BF16 AdamW
moments, FP8 activation caching).

The plan warns when the estimate does not fit the given GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from generated import PATH
from generated.config import Config, ModelConfig
from generated.names import ActivationCheckpointing, Dtype, PipelineSchedule
from runtime.distributed.layout import Layout, layout_for, stage_layers, stage_ranks

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


def _tokens_bytes(cfg: Config) -> int:
    """Tokens of one micro-batch times the bytes of one autocast-dtype value."""
    return (
        cfg.training.batch_size * cfg.training.seq_len * DTYPE_BYTES[str(cfg.system.device.dtype)]
    )


def _halves(cfg: Config) -> list[tuple[int, int]]:
    """Bytes the backward keeps of one micro-batch per block when nothing is recomputed: (attention
    half, feed-forward half), each with its norm; the main blocks, then the MTP blocks."""
    m = cfg.model
    tb = _tokens_bytes(cfg)
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
    halves = []
    for i in range(m.n_layers + m.mtp_depth):
        ffn = dense if i < m.first_k_dense else moe
        halves.append((tb * (attn + m.dim), tb * (ffn + m.dim)))
    return halves


def _kept(cfg: Config, i: int, halves: list[tuple[int, int]]) -> int:
    """What block i keeps of one micro-batch under the config's activation checkpointing, as the
    runtime does it (parallelize.py: `full` every block, `selective` blocks 0, 2, 4, ... of the
    whole model)."""
    mode = cfg.system.distributed.activation_checkpointing
    recomputed = mode == ActivationCheckpointing.FULL or (
        mode == ActivationCheckpointing.SELECTIVE and i % 2 == 0
    )
    # a recomputed block keeps only the inputs of its two halves
    return 2 * _tokens_bytes(cfg) * cfg.model.dim if recomputed else sum(halves[i])


def _up_projections(cfg: Config) -> int:
    """One micro-batch's attention-norm output and MLA q, k, v (the up-projections' results)."""
    m = cfg.model
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    return _tokens_bytes(cfg) * (m.dim + m.n_heads * (2 * qk + m.v_head_dim))


def _paper_kept(cfg: Config, i: int, halves: list[tuple[int, int]]) -> int:
    """What block i keeps under the DeepSeek-V3 report's recomputation (3.2.3): every RMSNorm
    output and MLA's up-projections (q, k, v) are recomputed in the backward, from the latents
    kept; all else is kept (the attention output among it)."""
    attention, feed_forward = halves[i]
    return attention - _up_projections(cfg) + feed_forward - _tokens_bytes(cfg) * cfg.model.dim


def _logits(cfg: Config) -> int:
    """fp32 logits of one micro-batch, the head's and the MTP heads'."""
    m, t = cfg.model, cfg.training
    return t.batch_size * t.seq_len * m.vocab_size * 4 * (1 + m.mtp_depth)


def activation_bytes(cfg: Config, layout: Layout) -> float:
    """Rough bytes the backward keeps per process for one micro-batch (see the module doc)."""
    halves = _halves(cfg)
    kept = 0.0
    for i in range(len(halves)):
        kept += _kept(cfg, i, halves)
    if cfg.system.distributed.activation_checkpointing != ActivationCheckpointing.NONE:
        kept += max(max(h) for h in halves)  # one half recomputed at a time
    return kept + 2 * _logits(cfg)  # fp32 logits and their gradient


# ------------------------------------------------------------------------------------ pipeline

# F : B : W, a stage's forward, backward for the inputs and backward for the weights of one
# micro-batch (the usual estimate: a backward costs two forwards, half for each gradient)
F_TIME, B_TIME, W_TIME = 1.0, 1.0, 1.0
V_SCHEDULES = (PipelineSchedule.ZBV, PipelineSchedule.DUALPIPEV)
BUBBLE_FORMULA = {
    PipelineSchedule.GPIPE: "(P - 1) / (m + P - 1)",
    PipelineSchedule.V1F1B: "(P - 1) / (m + P - 1)",
    PipelineSchedule.INTERLEAVED_1F1B: "(P - 1) / (v m + P - 1)",
    PipelineSchedule.ZBV: "(P - 1)(F + B - 2W) / 2 idle, 0 at F = B = W",
    PipelineSchedule.DUALPIPEV: "(P - 1) / (6 m + P - 1)",
}


def in_flight(schedule: str, P: int, v: int, m: int) -> list[int]:
    """Micro-batches whose activations each of the P v stages keeps at its rank's peak (module
    doc)."""
    S = P * v
    if schedule == PipelineSchedule.GPIPE:
        return [m] * S
    if schedule == PipelineSchedule.ZBV:
        return [min(m, S - s - (1 if s < P else 0)) for s in range(S)]
    if schedule == PipelineSchedule.DUALPIPEV:
        return [min(m, S - s) for s in range(S)]
    if schedule == PipelineSchedule.INTERLEAVED_1F1B:
        counts = [0] * S
        for r in range(P):
            # Megatron-LM's (and torch's ScheduleInterleaved1F1B's) warm-up forwards, plus one
            left, group = min(m * v, (v - 1) * P + 2 * (P - r) - 1), 0
            while left > 0 and group * P < m:
                size = min(P, m - group * P)  # forwards run P micro-batches per stage at a time
                for k in range(v):
                    take = min(size, left)
                    counts[k * P + r] += take
                    left -= take
                group += 1
        return counts
    return [min(m, P - s) for s in range(S)]  # 1f1b


def bubble_fraction(schedule: str, P: int, v: int, m: int) -> float:
    """Idle time / (idle time + m (F + B + W)) of a step (module doc)."""
    F, B, W = F_TIME, B_TIME, W_TIME
    if schedule == PipelineSchedule.INTERLEAVED_1F1B:
        idle = (P - 1) * (F + B + W) / v
    elif schedule == PipelineSchedule.ZBV:
        idle = max(0.0, (P - 1) * (F + B - 2 * W) / 2)
    elif schedule == PipelineSchedule.DUALPIPEV:
        idle = (P - 1) * ((F + B + W) + B - 3 * W) / 2
    else:
        idle = (P - 1) * (F + B + W)
    return idle / (idle + m * (F + B + W))


def _embedding(m: ModelConfig) -> ParamCounts:
    return ParamCounts(m.vocab_size * m.dim, m.dim, 0, m.vocab_size * m.dim)


def _head(m: ModelConfig) -> ParamCounts:
    """The final norm, the head and the MTP modules: what the last stage holds besides blocks."""
    head = m.vocab_size * m.dim + m.dim
    _, mtp = count_params(m)
    return ParamCounts(head, head, 0, 0) + mtp


def _per_process(params: ParamCounts, layout: Layout) -> float:
    """Parameters one process of a stage holds: sharded over dp_shard x expert_parallel."""
    if not layout.sharded:
        return float(params.total)
    shard = layout.dp_shard * layout.expert_parallel
    return (params.total - params.experts) / shard + params.experts / shard


@dataclass
class _Stage:
    params: ParamCounts
    kept: float  # activation bytes per micro-batch in flight
    paper_kept: float  # the same under the report's recomputation
    transient: float  # what only one backward at a time needs
    paper_transient: float  # the same under the report's recomputation


def _stage(cfg: Config, layers: range, first: bool, last: bool, copy: bool) -> _Stage:
    m = cfg.model
    halves = _halves(cfg)
    params = ParamCounts(0, 0, 0, 0)
    for i in layers:
        params = params + _block(m, i)
    if first or (last and copy):
        params = params + _embedding(m)
    mtp_blocks = range(m.n_layers, m.n_layers + m.mtp_depth) if last else range(0)
    if last:
        params = params + _head(m)  # MTP blocks included
    blocks = [*layers, *mtp_blocks]
    logits = _logits(cfg) if last else 0
    recomputes = cfg.system.distributed.activation_checkpointing != ActivationCheckpointing.NONE
    return _Stage(
        params,
        float(sum(_kept(cfg, i, halves) for i in blocks) + logits),
        float(sum(_paper_kept(cfg, i, halves) for i in blocks) + logits),
        # the half block being recomputed (the report's: one block's norm output and q, k, v),
        # the logits' gradient
        (max(max(halves[i]) for i in blocks) if recomputes else 0) + logits,
        _up_projections(cfg) + logits,
    )


def pipeline_plan(cfg: Config, layout: Layout, gpu_memory_gib: float) -> dict[str, Any]:
    """Stages, ranks and the heaviest rank's memory of a pipelined layout (module doc)."""
    m, dist = cfg.model, cfg.system.distributed
    P, v = layout.pipeline_parallel, dist.pipeline_stages_per_rank or 1
    schedule = str(dist.pipeline_schedule)
    S = P * v
    micro = max(1, cfg.training.gradient_accumulation_steps // layout.data_parallel)
    layers = stage_layers(m.n_layers, S, dist.pipeline_split)
    ranks = stage_ranks(schedule in V_SCHEDULES, P, v)
    flight = in_flight(schedule, P, v, micro)
    copy = m.mtp_depth > 0 and ranks[-1] != ranks[0]  # the embedding MTP reads, held twice
    built = [_stage(cfg, layers[s], s == 0, s == S - 1, copy) for s in range(S)]
    stages = [
        {
            "stage": s,
            "rank": ranks[s],
            "layers": [layers[s].start, layers[s].stop],
            "embedding": s == 0 or (s == S - 1 and copy),
            "head": s == S - 1,
            "params": st.params.total,
            "state_bytes": _per_process(st.params, layout) * 16,  # fp32 weights, grads, 2 moments
            "in_flight": flight[s],
            "activation_bytes_per_micro_batch": st.kept,
            "activation_bytes": flight[s] * st.kept,
        }
        for s, st in enumerate(built)
    ]
    per_rank: list[dict[str, Any]] = []
    paper: list[float] = []
    for r in range(P):
        own = [s for s in range(S) if ranks[s] == r]
        per_proc = sum(_per_process(built[s].params, layout) for s in own)
        acts = sum(flight[s] * built[s].kept for s in own) + max(built[s].transient for s in own)
        paper_acts = sum(flight[s] * built[s].paper_kept for s in own)
        paper.append(paper_acts + max(built[s].paper_transient for s in own))
        per_rank.append(
            {
                "rank": r,
                "stages": own,
                "params": sum(built[s].params.total for s in own),
                "weights": per_proc * 4,
                "grads": per_proc * 4,
                "optimizer": per_proc * 8,
                "activations_estimate": acts,
                "total": per_proc * 16 + acts,
            }
        )
    heaviest = max(per_rank, key=lambda rank: rank["total"])
    result: dict[str, Any] = {
        "pipeline_parallel": P,
        "schedule": schedule,
        "stages_per_rank": v,
        "micro_batches": micro,
        "bubble_fraction": bubble_fraction(schedule, P, v, micro),
        "bubble_formula": BUBBLE_FORMULA[PipelineSchedule(schedule)],
        "stages": stages,
        "ranks": per_rank,
        "heaviest_rank": heaviest["rank"],
        "fits": heaviest["total"] <= gpu_memory_gib * GIB,
    }
    if dist.activation_checkpointing == ActivationCheckpointing.SELECTIVE:
        totals = [
            rank["total"] - rank["activations_estimate"] + a for rank, a in zip(per_rank, paper)
        ]
        worst = max(range(P), key=lambda r: totals[r])
        result["paper_recomputation"] = {
            "rank": worst,
            "activations_estimate": paper[worst],
            "total": totals[worst],
            "fits": totals[worst] <= gpu_memory_gib * GIB,
        }
    return result


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
    pipeline = None
    if layout.pipelined:  # a process holds its stages: the heaviest pipeline rank's memory
        pipeline = pipeline_plan(cfg, layout, gpu_memory_gib)
        heaviest = pipeline["ranks"][pipeline["heaviest_rank"]]
        weights, grads, optim = heaviest["weights"], heaviest["grads"], heaviest["optimizer"]
        acts = heaviest["activations_estimate"]
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
    if pipeline is not None:
        result["pipeline"] = pipeline
    if problem:
        result["warnings"].append(f"layout: {problem}")
    accumulation = cfg.training.gradient_accumulation_steps
    if layout.pipelined and not problem and accumulation % layout.data_parallel:
        result["warnings"].append(
            f"layout: {PATH.training.gradient_accumulation_steps} ({accumulation}) does not divide "
            f"by the {layout.data_parallel} data-parallel processes (world / "
            f"{PATH.system.distributed.pipeline_parallel})"
        )
    more = (
        f"{PATH.system.distributed.pipeline_parallel}, {PATH.system.distributed.dp_shard}"
        if layout.pipelined
        else PATH.system.distributed.dp_shard
    )
    if need > gpu_memory_gib * GIB:
        result["warnings"].append(
            f"does not fit: about {need / GIB:,.1f} GiB per process needed, {gpu_memory_gib:g} GiB "
            f"available; raise {more} or "
            f"{PATH.system.distributed.expert_parallel} (more processes), set "
            f"{PATH.system.distributed.activation_checkpointing}, or lower "
            f"{PATH.training.batch_size} / {PATH.training.seq_len}"
        )
    return result
