"""`deepseek-moe plan CONFIG [--section.field VALUE ...] [--world N] [--gpu-memory GiB] [--json]`:
what a config costs before anything is launched (no torch, no weights): parameters, training FLOPs
per token and per-process memory of the layout, from the model family's cost model
(runtime/models/deepseek_v3/cost.py); with system.distributed.pipeline_parallel > 1 also the
schedule's micro-batches and bubble, each stage's rank, layers, parameters and memory, and the
heaviest rank's total per GPU (the memory line is that rank's). It warns, and exits 1, when the estimate does not fit
`--gpu-memory` (default 80 GiB, an H100's) or the layout does not fit the world size.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from generated.parser import resolve
from runtime.cli import console
from runtime.models import get_model_spec

PROG = "plan"
GIB = 1024**3


def _b(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:,.2f}{unit}"
    return f"{n:,.0f}"


def format_plan(result: dict[str, Any]) -> str:
    p, mem, lay = result["params"], result["memory_per_process_bytes"], result["layout"]
    lines = [
        f"parameters      main {_b(p['main']['total'])} total, {_b(p['main']['active'])} activated per token "
        f"({p['main']['total']:,} / {p['main']['active']:,})",
        f"                mtp  {_b(p['mtp']['total'])} total, {_b(p['mtp']['active'])} activated "
        f"({p['mtp']['total']:,} / {p['mtp']['active']:,})",
        f"flops per token main {result['flops_per_token']['main']:.3e}, "
        f"mtp {result['flops_per_token']['mtp']:.3e} (training: forward + backward)",
        f"layout          {lay['world']} processes = "
        + (f"pipeline_parallel {lay['pipeline_parallel']} x " if "pipeline" in result else "")
        + f"dp_replicate {lay['dp_replicate']} x "
        f"dp_shard {lay['dp_shard']} x expert_parallel {lay['expert_parallel']}"
        + (" (FSDP2)" if lay["dp_shard"] > 1 or lay["expert_parallel"] > 1 else " (DDP)")
        + (" per stage" if "pipeline" in result else ""),
        "memory/process  "
        + ", ".join(
            f"{k} {mem[k] / GIB:,.2f} GiB"
            for k in ("weights", "grads", "optimizer", "activations_estimate")
        )
        + f"; total {mem['total'] / GIB:,.2f} GiB of {result['gpu_memory_gib']:g} GiB",
    ]
    if "pipeline" in result:
        lines += format_pipeline(result["pipeline"], result["gpu_memory_gib"])
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def format_pipeline(pipe: dict[str, Any], gpu_memory_gib: float) -> list[str]:
    """The pipeline part: schedule, bubble, one row per stage, the heaviest rank."""
    v = pipe["stages_per_rank"]
    lines = [
        f"pipeline        {pipe['pipeline_parallel']} ranks x {v} stage{'s' if v > 1 else ''} "
        f"per rank, {pipe['schedule']}, {pipe['micro_batches']} micro-batches per step; bubble "
        f"{pipe['bubble_fraction']:.1%} ({pipe['bubble_formula']}; F : B : W = 1 : 1 : 1)",
        "  stage  rank  layers                params  weights+grads+optimizer  "
        "activations (in flight x per micro-batch)",
    ]
    for st in pipe["stages"]:
        first, stop = st["layers"]
        parts = [f"{first}-{stop - 1}" if stop - first > 1 else f"{first}"]
        if st["embedding"]:
            parts.insert(0, "embed")
        if st["head"]:
            parts.append("head+mtp")
        lines.append(
            f"  {st['stage']:>5}  {st['rank']:>4}  {' '.join(parts):<20} {_b(st['params']):>8}  "
            f"{_gib(st['state_bytes']):>23}  {st['in_flight']} x "
            f"{_gib(st['activation_bytes_per_micro_batch'])} = {_gib(st['activation_bytes'])}"
        )
    rank = pipe["ranks"][pipe["heaviest_rank"]]
    state = rank["weights"] + rank["grads"] + rank["optimizer"]
    held = sum(pipe["stages"][s]["activation_bytes"] for s in rank["stages"])
    lines.append(
        f"heaviest rank   {rank['rank']} (stages {', '.join(map(str, rank['stages']))}): "
        f"weights+grads+optimizer {_gib(state)}, activations {_gib(rank['activations_estimate'])} "
        f"({_gib(held)} in flight, {_gib(rank['activations_estimate'] - held)} for one backward); "
        f"total {_gib(rank['total'])} per GPU of {gpu_memory_gib:g} GiB: "
        + ("fits" if pipe["fits"] else "does not fit")
    )
    paper = pipe.get("paper_recomputation")
    if paper:
        lines.append(
            "                with the report's recomputation instead (every RMSNorm and MLA "
            f"up-projection, 3.2.3): rank {paper['rank']} activations "
            f"{_gib(paper['activations_estimate'])}, total {_gib(paper['total'])}: "
            + ("fits" if paper["fits"] else "does not fit")
        )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime plan",
        description="Parameters, FLOPs and per-process memory of a config (no torch needed).",
    )
    parser.add_argument("config", help="config file")
    parser.add_argument("--world", type=int, default=1, help="processes (default 1)")
    parser.add_argument(
        "--gpu-memory", type=float, default=80.0, help="GiB per process (default 80)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    known, overrides = parser.parse_known_args(argv)
    if known.world < 1:
        parser.error("--world must be at least 1")
    return console.run_command(PROG, lambda: _plan(known, overrides))


def _plan(known: argparse.Namespace, overrides: list[str]) -> int:
    cfg = resolve(known.config, argv=overrides).config
    result = get_model_spec().plan(cfg, known.world, known.gpu_memory)
    print(json.dumps(result, indent=2) if known.json else format_plan(result))
    return console.EXIT_FAILURE if result["warnings"] else console.EXIT_OK
