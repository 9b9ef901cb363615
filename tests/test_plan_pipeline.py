"""`plan` with pipeline parallelism: per-stage parameters and memory, in-flight micro-batches and
bubble per schedule, pinned against a hand calculation on the tiny config cut into 2 stages; the
paper's layout; unchanged output without a pipeline; layout errors naming pipeline_parallel."""

import json
import os

import pytest

from generated.parser import load_config
from helpers import REPO
from runtime.cli.plan import main as plan_main
from runtime.models.deepseek_v3.cost import bubble_fraction, count_params, in_flight, plan

TINY = os.path.join(REPO, "configs", "tiny.yaml")
FULL = os.path.join(REPO, "configs", "deepseek_v3.yaml")
GIB = 1024**3

# configs/tiny.yaml: vocab 256, dim 128, inter_dim 384, moe_inter_dim 96, 4 layers (the first
# dense), 4 heads, q_lora_rank 0, kv_lora_rank 32, qk_nope 32, qk_rope 16, v 32, 8 routed experts
# (top 2) and 1 shared, one MTP module. 2 sequences of 64 tokens per micro-batch in bfloat16,
# 4 micro-batches per step on 2 processes = 2 pipeline ranks.
TWO_STAGES = (
    "--system.distributed.pipeline_parallel", "2",
    "--training.batch_size", "2", "--training.seq_len", "64",
    "--training.gradient_accumulation_steps", "4",
    "--system.device.dtype", "bfloat16",
)  # fmt: skip

ATTENTION = (
    128 * 4 * 48  # wq (no q_lora): dim x heads x (nope + rope)
    + 128 * (32 + 16)  # wkv_a
    + 32  # kv_norm
    + 32 * 4 * (32 + 32)  # wkv_b
    + 4 * 32 * 128  # wo
)
BASE = 2 * 128 + ATTENTION  # + attn_norm, ffn_norm
DENSE = BASE + 3 * 128 * 384
EXPERT = 3 * 128 * 96
MOE = BASE + 8 * 128 + EXPERT + 8 * EXPERT  # router, shared expert, routed experts
EMBED = HEAD = 256 * 128
MTP = 3 * 128 + 2 * 128 * 128 + MOE  # enorm, hnorm, norm, eh_proj and its block
STAGE0 = EMBED + DENSE + MOE  # layers 0, 1
STAGE1 = MOE + MOE + 128 + HEAD + MTP  # layers 2, 3, final norm, head, MTP
COPY = EMBED  # the last stage's copy of the embedding (MTP reads it), on another rank

# activations of one micro-batch, in bytes: tokens x 2 (bf16) x values per token
TB = 2 * 64 * 2
ATTN_HALF = TB * (2 * 128 + 32 + 16 + 4 * (2 * 48 + 2 * 32) + 128)
DENSE_HALF = TB * (3 * 384 + 128)
MOE_HALF = TB * (2 * (128 + 4 * 96) + 3 * 96 + 128)
LOGITS = 2 * 64 * 256 * 4 * 2  # fp32, head and MTP head
DENSE_ACTS, MOE_ACTS = ATTN_HALF + DENSE_HALF, ATTN_HALF + MOE_HALF
RECOMPUTED = 2 * TB * 128  # a checkpointed block keeps its two half inputs
UP_PROJECTIONS = TB * (128 + 4 * (2 * 48 + 32))  # attention-norm output, q, k, v


def tiny_plan(*flags):
    cfg = load_config(TINY, argv=[*TWO_STAGES, *flags])
    return plan(cfg, 2, 80.0)


def test_stage_params_match_the_hand_count():
    main, mtp = count_params(load_config(TINY).model)
    assert STAGE0 + STAGE1 == main.total + mtp.total  # the hand count is the whole model
    pipe = tiny_plan()["pipeline"]
    assert [s["params"] for s in pipe["stages"]] == [STAGE0, STAGE1 + COPY]
    assert [s["layers"] for s in pipe["stages"]] == [[0, 2], [2, 4]]
    assert [s["rank"] for s in pipe["stages"]] == [0, 1]
    # one process per stage (no sharding): fp32 weights, gradients and two AdamW moments
    assert [s["state_bytes"] for s in pipe["stages"]] == [STAGE0 * 16, (STAGE1 + COPY) * 16]
    # V schedules: stages 0 and 3 on rank 0, which holds the embedding once
    pipe = tiny_plan("--system.distributed.pipeline_schedule", "dualpipev")["pipeline"]
    stages = pipe["stages"]
    assert [s["rank"] for s in stages] == [0, 1, 1, 0]
    assert [s["layers"] for s in stages] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert [s["params"] for s in stages] == [EMBED + DENSE, MOE, MOE, MOE + 128 + HEAD + MTP]
    assert pipe["ranks"][0]["params"] == EMBED + DENSE + MOE + 128 + HEAD + MTP


def test_memory_per_rank_matches_the_hand_calculation():
    out = tiny_plan()
    pipe = out["pipeline"]
    assert pipe["micro_batches"] == 4 and pipe["schedule"] == "1f1b"
    assert pipe["bubble_fraction"] == pytest.approx(1 / 5)  # (P - 1) / (m + P - 1)
    # 1F1B: rank 0 keeps P = 2 micro-batches, the last rank 1; no recomputation
    assert [s["in_flight"] for s in pipe["stages"]] == [2, 1]
    per_micro = [DENSE_ACTS + MOE_ACTS, 3 * MOE_ACTS + LOGITS]  # the last: blocks 2, 3 and MTP's
    assert [s["activation_bytes_per_micro_batch"] for s in pipe["stages"]] == per_micro
    rank0, rank1 = pipe["ranks"]
    assert rank0["activations_estimate"] == 2 * per_micro[0]
    assert rank1["activations_estimate"] == per_micro[1] + LOGITS  # + the logits' gradient
    assert rank0["total"] == STAGE0 * 16 + 2 * per_micro[0]
    assert rank1["total"] == (STAGE1 + COPY) * 16 + per_micro[1] + LOGITS
    assert pipe["heaviest_rank"] == 1 and pipe["fits"]
    mem = out["memory_per_process_bytes"]  # the memory line is the heaviest rank's
    assert mem["total"] == rank1["total"] and mem["weights"] == (STAGE1 + COPY) * 4
    # selective: blocks 0, 2, 4 (MTP) recomputed; one half at a time on top
    pipe = tiny_plan("--system.distributed.activation_checkpointing", "selective")["pipeline"]
    stage0, stage1 = (s["activation_bytes_per_micro_batch"] for s in pipe["stages"])
    assert stage0 == RECOMPUTED + MOE_ACTS
    assert stage1 == RECOMPUTED + MOE_ACTS + RECOMPUTED + LOGITS
    assert pipe["ranks"][0]["activations_estimate"] == 2 * stage0 + MOE_HALF
    # the report's recomputation: every norm output and q, k, v recomputed in every block
    paper_rank1 = 3 * (MOE_ACTS - UP_PROJECTIONS - TB * 128) + LOGITS
    paper = pipe["paper_recomputation"]
    assert paper["rank"] == 1
    assert paper["total"] == (STAGE1 + COPY) * 16 + paper_rank1 + UP_PROJECTIONS + LOGITS


@pytest.mark.parametrize(
    "schedule, flight, bubble",
    [
        ("gpipe", [4, 4], 1 / 5),
        ("1f1b", [2, 1], 1 / 5),
        # Megatron's warm-up + 1: rank 0 (v - 1) P + 2 P - 1 = 5 stage micro-batches, rank 1 3
        ("interleaved_1f1b", [3, 2, 2, 1], 1 / (2 * 4 + 1)),
        ("zbv", [3, 2, 2, 1], 0.0),  # 2P per rank
        ("dualpipev", [4, 3, 2, 1], 1 / (6 * 4 + 1)),  # 2P + 1 per rank
    ],
)
def test_schedules_in_flight_and_bubble(schedule, flight, bubble):
    v = 1 if schedule in ("gpipe", "1f1b") else 2
    assert in_flight(schedule, 2, v, 4) == flight
    assert bubble_fraction(schedule, 2, v, 4) == pytest.approx(bubble)
    pipe = tiny_plan("--system.distributed.pipeline_schedule", schedule)["pipeline"]
    assert [s["in_flight"] for s in pipe["stages"]] == flight
    assert pipe["stages_per_rank"] == v


def test_in_flight_follows_the_literature():
    P, v, m = 16, 2, 120
    # 1F1B: rank r keeps P - r; fewer micro-batches than stages cap it
    assert in_flight("1f1b", P, 1, m) == [P - r for r in range(P)]
    assert in_flight("1f1b", 4, 1, 2) == [2, 2, 2, 1]
    # interleaved, rank 0: (1 + (P - 1) / (P v)) x P micro-batches of a rank's layers
    inter = in_flight("interleaved_1f1b", P, v, m)
    assert (inter[0] + inter[P]) / v == pytest.approx((1 + (P - 1) / (P * v)) * P)
    # V schedules: every rank alike, ZB-V 2P stage micro-batches, DualPipeV 2P + 1
    for schedule, per_rank in (("zbv", 2 * P), ("dualpipev", 2 * P + 1)):
        counts = in_flight(schedule, P, 2, m)
        assert {counts[r] + counts[2 * P - 1 - r] for r in range(P)} == {per_rank}


def test_paper_layout(capsys):
    flags = ["--world", "2048", "--system.distributed.pipeline_parallel", "16",
             "--system.distributed.expert_parallel", "64",
             "--system.distributed.activation_checkpointing", "selective"]  # fmt: skip
    assert plan_main([FULL, *flags]) == 0
    text = capsys.readouterr().out
    assert "2048 processes = pipeline_parallel 16 x dp_replicate 2 x dp_shard 1 x " in text
    assert "expert_parallel 64" in text and "120 micro-batches" in text
    assert "per GPU of 80 GiB: fits" in text
    assert plan_main([FULL, *flags, "--json"]) == 0
    pipe = json.loads(capsys.readouterr().out)["pipeline"]
    assert len(pipe["stages"]) == 16 and pipe["micro_batches"] == 120
    assert pipe["bubble_fraction"] == pytest.approx(15 / 135)
    heaviest = pipe["ranks"][pipe["heaviest_rank"]]
    assert pipe["fits"] and heaviest["total"] < 80 * GIB
    # the embedding copy of the last stage; total = the model's + the copy
    main, mtp = count_params(load_config(FULL).model)
    assert sum(s["params"] for s in pipe["stages"]) == main.total + mtp.total + 129280 * 7168
    assert plan_main([FULL, *flags, "--system.distributed.pipeline_schedule", "dualpipev"]) == 0
    text = capsys.readouterr().out
    assert "16 ranks x 2 stages per rank, dualpipev" in text and "heaviest rank" in text


# the output before pipelines existed (the README's example, whose activations predate the current
# estimate)
P1_OUTPUT = """\
parameters      main 671.03B total, 36.63B activated per token (671,026,404,352 / 36,625,610,752)
                mtp  11.61B total, 688.10M activated (11,610,067,968 / 688,100,352)
flops per token main 2.505e+11, mtp 4.632e+09 (training: forward + backward)
layout          256 processes = dp_replicate 1 x dp_shard 32 x expert_parallel 8 (FSDP2)
memory/process  weights 9.93 GiB, grads 9.93 GiB, optimizer 19.87 GiB, activations_estimate 15.71 GiB; total 55.45 GiB of 80 GiB
"""


def test_without_a_pipeline_the_output_is_unchanged(capsys):
    flags = ["--world", "256", "--system.distributed.dp_shard", "32",
             "--system.distributed.expert_parallel", "8", "--training.batch_size", "1"]  # fmt: skip
    assert plan_main([FULL, *flags]) == 0
    assert capsys.readouterr().out == P1_OUTPUT
    assert plan_main([FULL, *flags, "--json"]) == 0
    assert "pipeline" not in json.loads(capsys.readouterr().out)


def test_layout_errors_name_pipeline_parallel(capsys):
    assert plan_main([TINY, "--world", "6", "--system.distributed.pipeline_parallel", "4"]) == 1
    out = capsys.readouterr().out
    assert "warning: layout: system.distributed.pipeline_parallel (4) * " in out
    flags = ["--world", "4", "--system.distributed.pipeline_parallel", "2",
             "--system.distributed.dp_replicate", "3"]  # fmt: skip
    assert plan_main([TINY, *flags]) == 1
    assert "system.distributed.pipeline_parallel (2) * system.distributed.dp_replicate (3)" in (
        capsys.readouterr().out
    )
    # micro-batches per step that do not divide over the data-parallel processes
    flags = ["--world", "6", "--system.distributed.pipeline_parallel", "2",
             "--training.gradient_accumulation_steps", "4"]  # fmt: skip
    assert plan_main([TINY, *flags]) == 1
    assert "training.gradient_accumulation_steps (4) does not divide by the 3" in (
        capsys.readouterr().out
    )
