"""`deepseek-moe data prepare INPUT... --tokenizer SRC --out DIR`, `deepseek-moe data inspect DIR`
and `deepseek-moe data replay [CONFIG] --step N` (replay.py).

prepare: JSONL (plain or .gz), parquet and text files, or folders of them, tokenized in worker
processes into a dataset folder that `data.sources` trains on (runtime/components/data/prepare.py).
A progress bar on a terminal, a log line every few seconds otherwise. Bad records are listed as
`file:line: what` and nothing is written (exit 2), or skipped and counted with `--skip-bad`.

inspect: a prepared folder (or a Megatron prefix): documents, tokens, shards, tokenizer and a few
decoded samples; `--json` for one JSON object.

replay: the token ids and text of a training step's batches. It needs torch, which prepare's
workers must not load: replay.py is imported only when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from generated import PATH
from runtime.cli import console
from runtime.components.data.prepare import (
    MANIFEST,
    Counts,
    PrepareError,
    Settings,
    prepare,
)
from runtime.components.data.sources import SourceError, open_source
from runtime.components.tokenizer import TextCodec, TokenizerError

PROG = "data"
USAGE = """usage: deepseek-moe data COMMAND ...

commands:
  prepare INPUT... --tokenizer SRC --out DIR   tokenize a corpus into a dataset folder
  inspect DIR [--json]                         what a dataset folder (or Megatron prefix) holds
  replay [CONFIG] --step N [--world W] [--rank R] [--json]
                                               the token ids and text a training step reads
"""


class UsageError(Exception):
    """Wrong arguments: exit 2 with the message."""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return console.EXIT_OK if argv else console.EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command == "prepare":
        return _prepare_main(rest)
    if command == "inspect":
        return _inspect_main(rest)
    if command == "replay":
        from runtime.cli import replay  # torch, which prepare must not load: only here

        return replay.main(rest)
    console.error(PROG, f"unknown command {command!r}; one of prepare, inspect, replay")
    return console.EXIT_USAGE


# ---------------------------------------------------------------------------------------------
# prepare


def _size(text: str) -> int:
    t = text.strip().upper().replace("_", "")
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if t.endswith(unit):
            return int(float(t[:-1]) * mult)
    return int(t)


def _prepare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deepseek-moe data prepare",
        description=f"Tokenize JSONL / parquet / text files into a dataset folder for {PATH.data.sources}.",
    )
    parser.add_argument("inputs", nargs="+", help="files or folders (walked in sorted order)")
    parser.add_argument(
        "--tokenizer", required=True, help="a Hugging Face folder or tokenizer.json"
    )
    parser.add_argument("--out", required=True, help="the dataset folder to write")
    parser.add_argument("--text-field", default="text", help="JSONL key / parquet column (text)")
    parser.add_argument(
        "--eos-token", help="the end-of-document token, if the tokenizer names none"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="tokenizer processes (0: one per CPU)"
    )
    parser.add_argument(
        "--shard-tokens", default="256M", help="tokens per shard at most (256M, 10K, 1000)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.005,
        help="share of documents held out for validation, chosen by hash (0: none)",
    )  # fmt: skip
    parser.add_argument("--skip-bad", action="store_true", help="skip bad records, count them")
    args = parser.parse_args(argv)
    return console.run_command("data prepare", lambda: _prepare_or_refuse(args))


def _prepare_or_refuse(args: argparse.Namespace) -> int:
    try:
        return _prepare(args)
    except (PrepareError, TokenizerError) as error:  # the inputs or settings: bad input
        console.error("data prepare", error)
        return console.EXIT_USAGE


def _prepare(args: argparse.Namespace) -> int:
    try:
        shard_tokens = _size(args.shard_tokens)
    except ValueError:
        raise PrepareError(
            f"--shard-tokens {args.shard_tokens!r} is not a count (256M, 10K, 1000)"
        ) from None
    if shard_tokens < 1 or not 0 <= args.val_fraction < 1 or args.workers < 0:
        raise PrepareError("--shard-tokens must be >= 1, --val-fraction in [0, 1), --workers >= 0")
    codec = TextCodec.from_path(args.tokenizer)
    if args.eos_token is not None:
        eos = codec.tokenizer.token_to_id(args.eos_token)
        if eos is None:
            console.error(
                "data prepare",
                f"--eos-token {args.eos_token!r} is not in the tokenizer's vocabulary",
            )
            return console.EXIT_USAGE
        codec.eos_id = eos
    settings = Settings(
        args.text_field, shard_tokens, args.val_fraction, args.skip_bad, args.workers
    )
    progress = _Progress()
    try:
        report = prepare(args.inputs, codec, args.tokenizer, args.out, settings, progress)
    finally:
        progress.close()
    if report.reused:
        m = report.manifest
        print(
            f"{args.out}: up to date ({m['documents']:,} documents, {m['tokens']:,} tokens); nothing to do"
        )
        return console.EXIT_OK
    if report.problems and not args.skip_bad:
        console.error("data prepare", "bad records; nothing written (--skip-bad skips them):")
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        return console.EXIT_USAGE
    m = report.manifest
    skipped = f", skipped {m['skipped_records']:,} bad records" if m["skipped_records"] else ""
    print(
        f"wrote {args.out}: {m['documents']:,} documents, {m['tokens']:,} tokens "
        f"({m['validation']['documents']:,} documents held out for validation), "
        f"{len(m['train']['shards']) + len(m['validation']['shards'])} shards of {m['dtype']}{skipped}"
    )
    return console.EXIT_OK


class _Progress:
    """A tqdm bar over the input bytes on a terminal; a log line every 10 s otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, counts: Counts) -> None:
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare")
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(docs=f"{counts.documents:,}", tokens=f"{counts.tokens:,}")
            return
        now = time.monotonic()
        if now - self.last >= 10 or done == total:
            self.last = now
            rate = done / max(now - self.start, 1e-9) / 1e6
            print(
                f"prepare: {100 * done / max(total, 1):.0f}% of {total / 1e6:,.1f} MB, "
                f"{counts.documents:,} documents, {counts.tokens:,} tokens, {rate:.1f} MB/s",
                file=sys.stderr, flush=True,
            )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# inspect


def _inspect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deepseek-moe data inspect",
        description="What a dataset folder or Megatron prefix holds.",
    )
    parser.add_argument("path", help="a prepared dataset folder, or a Megatron PREFIX")
    parser.add_argument("--samples", type=int, default=3, help="documents to decode (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    return console.run_command("data inspect", lambda: _inspect(args), (SourceError,))


def _inspect(args: argparse.Namespace) -> int:
    source = open_source(args.path)
    codec = None
    if source.tokenizer_file is not None and os.path.isfile(source.tokenizer_file):
        codec = TextCodec.from_path(source.tokenizer_file)
    shards = source.train.shards + (source.val.shards if source.val else [])
    info: dict[str, Any] = {
        "path": args.path,
        "kind": source.kind,
        "documents": sum(s.n_documents for s in shards),
        "tokens": sum(s.n_tokens for s in shards),
        "shards": [
            {
                "prefix": os.path.basename(s.prefix),
                "documents": s.n_documents,
                "tokens": s.n_tokens,
                "dtype": s.tokens.dtype.name,
            }
            for s in shards
        ],  # fmt: skip
        "validation_documents": sum(s.n_documents for s in source.val.shards) if source.val else 0,
        "tokenizer": None,
        "samples": [],
    }
    if source.kind == "prepared":
        with open(os.path.join(args.path, MANIFEST)) as f:
            manifest = json.load(f)
        info["tokenizer"] = manifest["tokenizer"]
        info["inputs"] = len(manifest["inputs"])
        info["skipped_records"] = manifest.get("skipped_records", 0)
    first = source.train.shards[0]
    for d in range(min(args.samples, first.n_documents)):
        ids = np.asarray(first.tokens[first.doc_starts[d] : first.doc_starts[d + 1]])
        sample: dict[str, Any] = {
            "document": d,
            "tokens": len(ids),
            "ids": [int(t) for t in ids[:32]],
        }
        if codec is not None:
            sample["text"] = codec.decode(ids[:200])
        info["samples"].append(sample)
    if args.json:
        print(json.dumps(info))
        return console.EXIT_OK
    print(
        f"{args.path}: {source.kind} dataset, {info['documents']:,} documents, {info['tokens']:,} tokens"
    )
    for shard in info["shards"]:
        print(
            f"  {shard['prefix']}: {shard['documents']:,} documents, {shard['tokens']:,} tokens ({shard['dtype']})"
        )
    if info["validation_documents"]:
        print(f"  held out for validation: {info['validation_documents']:,} documents")
    tok = info["tokenizer"]
    if tok:
        print(
            f"tokenizer {tok['source']}: {tok['vocab_size']:,} ids, eos {tok['eos_id']}, bos {tok['bos_id']}, pad {tok['pad_id']}"
        )
    for sample in info["samples"]:
        text = sample.get("text")
        shown = repr(text[:160]) if text is not None else " ".join(map(str, sample["ids"]))
        print(f"document {sample['document']} ({sample['tokens']} tokens): {shown}")
    return console.EXIT_OK
