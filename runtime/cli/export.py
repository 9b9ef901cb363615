"""`deepseek-moe export SOURCE OUT_DIR [--dtype bfloat16] [--max-shard-size 5GB] [--no-mtp]`: a
model source (trainer checkpoint file, sharded checkpoint folder, Hugging Face folder) written as
a Hugging Face folder with its tokenizer (runtime/interop/hf_folder.py).

It streams: the source is read a tensor at a time (a stack of experts a few experts at a time) and
each safetensors shard is written as soon as it is full, so the model is never whole in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from runtime.checkpoint.format import CheckpointError
from runtime.cli import console
from runtime.interop.hf_folder import EXPORT_DTYPES, write_hf_folder
from runtime.interop.sources import load_source

PROG = "export"
# mistakes reported as one line, exit 1 (an unsupported model, a damaged or foreign source)
USER_ERRORS = (ValueError, KeyError, CheckpointError)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime export",
        description="Write a checkpoint as a Hugging Face DeepseekV3 folder.",
    )
    parser.add_argument("checkpoint", help="trainer checkpoint file (or a Hugging Face folder)")
    parser.add_argument(
        "out_dir", help="folder to write config.json, the weights and the tokenizer to"
    )
    parser.add_argument("--dtype", choices=list(EXPORT_DTYPES), default=list(EXPORT_DTYPES)[0])
    parser.add_argument(
        "--max-shard-size", default="5GB", help="shard above this many bytes (5GB, 200MB, 1000)"
    )
    parser.add_argument(
        "--no-mtp",
        action="store_true",
        help="leave out the MTP modules (transformers has none and reports their weights as UNEXPECTED keys)",
    )
    args = parser.parse_args(argv)
    return console.run_command(PROG, lambda: _export(args), USER_ERRORS)


def _export(args: argparse.Namespace) -> int:
    if os.path.realpath(args.out_dir) == os.path.realpath(args.checkpoint):
        raise ValueError(f"{args.out_dir} is the checkpoint itself; export to another folder")
    source = load_source(args.checkpoint)
    cfg, tensors = source.tensors()  # one at a time: a sharded checkpoint is never whole
    write_hf_folder(
        args.out_dir,
        cfg,
        tensors,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        tokenizer=source.tokenizer,
        mtp=not args.no_mtp,
        adapter=source.spec.adapter,
    )
    with torch.device("meta"):
        written = source.spec.build(
            dataclasses.replace(cfg, mtp_depth=0) if args.no_mtp else cfg, None
        )
    print(f"wrote {args.out_dir} ({sum(p.numel() for p in written.parameters()):,} parameters)")
    return console.EXIT_OK
