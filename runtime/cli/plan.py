"""`deepseek-moe plan CONFIG [--section.field VALUE ...] [--world N] [--gpu-memory GiB] [--json]`:
what a config costs before anything is launched (no torch, no weights): parameters, training FLOPs
per token and per-process memory of the layout, from the model family's cost model
(runtime/models/deepseek_v3/cost.py). It warns, and exits 1, when the estimate does not fit
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
        f"layout          {lay['world']} processes = dp_replicate {lay['dp_replicate']} x "
        f"dp_shard {lay['dp_shard']} x expert_parallel {lay['expert_parallel']}"
        + (" (FSDP2)" if lay["dp_shard"] > 1 or lay["expert_parallel"] > 1 else " (DDP)"),
        "memory/process  "
        + ", ".join(
            f"{k} {mem[k] / GIB:,.2f} GiB"
            for k in ("weights", "grads", "optimizer", "activations_estimate")
        )
        + f"; total {mem['total'] / GIB:,.2f} GiB of {result['gpu_memory_gib']:g} GiB",
    ]
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


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
