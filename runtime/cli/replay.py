"""`deepseek-moe data replay [CONFIG] [--section.field VALUE ...] --step N [--world W] [--rank R]
[--json]`: the batches optimizer step N (from 1, as `iter` in metrics.jsonl) of a run of CONFIG
trains on, per process (all W of them, or just R) and micro-batch: each sample's token ids and,
when the run's tokenizer is known, their text. Say to read the batches of a loss spike before
choosing `data.skip_steps`.

It reads them through the trainer's own data (runtime/trainer/trainer.py's data_module: the
DataModule and its BatchPlan, with the config's batch-size ramp and data.skip_steps), so what it
prints is what the run reads at that step. Imported by data.py only for `replay`: it needs torch.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from generated.parser import SPEC, resolve
from runtime.cli import console
from runtime.components.data.errors import DataError
from runtime.trainer.trainer import data_module

PROG = "data replay"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deepseek-moe data replay",
        usage="%(prog)s [CONFIG] [--section.field VALUE ...] --step N [--world W] [--rank R] [--json]",
        description="The token ids (and text) of the batches a training step reads.",
    )
    parser.add_argument("--step", type=int, required=True, help="optimizer step, from 1")
    parser.add_argument("--world", type=int, default=1, help="processes of the run (default 1)")
    parser.add_argument("--rank", type=int, help="only this process's micro-batches")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    known, rest = parser.parse_known_args(argv)
    positionals, flags, _ = SPEC.split_command_line(rest)
    if len(positionals) > 1:
        parser.error(f"one config file at most, got {' '.join(positionals)}")
    if known.step < 1 or known.world < 1:
        parser.error("--step and --world must be at least 1")
    if known.rank is not None and not 0 <= known.rank < known.world:
        parser.error(f"--rank must be in 0..{known.world - 1} (--world {known.world})")
    config = positionals[0] if positionals else None
    return console.run_command(PROG, lambda: _replay(known, config, flags), (DataError,))


def replay(cfg: Any, step: int, world: int = 1, ranks: list[int] | None = None) -> dict[str, Any]:
    """What optimizer step `step` (from 1) of a run of `cfg` on `world` processes reads: the
    processes `ranks` (all when None), each micro-batch's sample ids, token ids and text."""
    data = data_module(cfg, world)
    plan, index = data.plan, step - 1
    first = plan.ramp.samples_before(plan.position(index))
    out: dict[str, Any] = {
        "step": step,
        "batch": plan.position(index) + 1,  # the batch step N of a run without skips reads
        "skipped_batches": plan.skipped_batches(step),
        "global_batch": plan.global_batch(index),
        "sample_ids": [first, first + plan.global_batch(index) - 1],
        "window": cfg.training.seq_len + 1 + cfg.model.mtp_depth,
        "world": world,
        "ranks": [],
    }
    for rank in range(world) if ranks is None else ranks:
        reader = data.for_rank(rank)
        reader.next_step = index
        windows = next(reader.train_steps(step))
        micro_batches = []
        for m, (ids, tokens) in enumerate(zip(reader.plan.micro_batches(index), windows)):
            samples = []
            for sample, row in zip(ids, tokens.tolist()):
                entry: dict[str, Any] = {"id": sample, "tokens": row}
                if data.codec is not None:
                    entry["text"] = data.codec.decode(row)
                samples.append(entry)
            micro_batches.append({"micro_batch": m, "samples": samples})
        out["ranks"].append({"rank": rank, "micro_batches": micro_batches})
    return out


def format_replay(result: dict[str, Any]) -> str:
    skipped = result["skipped_batches"]
    moved = f" ({skipped} batch{'es' if skipped > 1 else ''} skipped so far)" if skipped else ""
    first, last = result["sample_ids"]
    lines = [
        f"step {result['step']}: batch {result['batch']}{moved}, {result['global_batch']} "
        f"sequences of {result['window']} tokens (sample ids {first}-{last}) on "
        f"{result['world']} process{'es' if result['world'] > 1 else ''}"
    ]
    for rank in result["ranks"]:
        for micro in rank["micro_batches"]:
            lines.append(f"rank {rank['rank']} micro-batch {micro['micro_batch']}:")
            for sample in micro["samples"]:
                lines.append(f"  sample {sample['id']}: {' '.join(map(str, sample['tokens']))}")
                if "text" in sample:
                    lines.append(f"    {sample['text']!r}")
    return "\n".join(lines)


def _replay(known: argparse.Namespace, config: str | None, flags: list[str]) -> int:
    cfg = resolve(config, argv=flags).config
    ranks = None if known.rank is None else [known.rank]
    result = replay(cfg, known.step, known.world, ranks)
    print(json.dumps(result) if known.json else format_replay(result))
    return console.EXIT_OK
