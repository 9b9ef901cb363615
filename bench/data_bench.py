"""Data: `data prepare` against the tokenizers library's own batch encoding, its peak memory as the
corpus grows, and the data loader's share of a training step on a 2-source mixture with document
masking.

The corpus is JSONL made from the running Python's standard library (each file a document, so
nothing is downloaded), tokenized with a byte-level BPE of 4,096 tokens trained on it here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from .common import Target, interleaved_medians

REPO = Path(__file__).resolve().parents[1]


def _stdlib_texts(limit_bytes: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    texts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                    texts.append(f.read())
                total += len(texts[-1])
                if total >= limit_bytes:
                    return texts
    return texts


def write_corpus(path: str, megabytes: float) -> int:
    """A JSONL file of about `megabytes` MB of stdlib sources (repeated as needed)."""
    texts = _stdlib_texts(8 << 20)
    target, written = int(megabytes * (1 << 20)), 0
    with open(path, "w") as f:
        while written < target:
            for text in texts:
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                written += len(line)
                if written >= target:
                    break
    return written


def make_tokenizer(folder: str) -> str:
    """A byte-level BPE of 4,096 tokens with an EOS, saved as a Hugging Face folder."""
    from runtime.components.tokenizer import TextCodec

    codec = TextCodec.train_bpe(_stdlib_texts(2 << 20), 4096 - 1)
    codec.tokenizer.add_special_tokens(["<|eos|>"])
    codec.eos_id = codec.tokenizer.token_to_id("<|eos|>")
    codec.kind = "pretrained"
    os.makedirs(folder, exist_ok=True)
    codec.save_hf(folder)
    return folder


PEAK = """
import json, resource, sys
from runtime.components.data.prepare import Settings, prepare
from runtime.components.tokenizer import TextCodec
corpus, tokenizer, out = sys.argv[1:4]
prepare([corpus], TextCodec.from_path(tokenizer), tokenizer, out, Settings(workers=2))
# this process's own high-water mark (VmHWM: ru_maxrss would also count the parent it was forked
# from before exec); the largest worker's (forked from this one: its shared pages count again)
with open("/proc/self/status") as f:
    own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"main_kb": own, "worker_kb": workers}))
"""


def _peak_mb(corpus: str, tokenizer: str, out: str) -> float:
    """Peak RSS of prepare in a fresh process: the main process plus twice its largest worker
    (an upper bound: pages a worker shares with the main process count twice)."""
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, corpus, tokenizer, out],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    return (peaks["main_kb"] + 2 * peaks["worker_kb"]) / 1024


def run(quick: bool = False) -> dict:
    from runtime.components.data.prepare import Settings, prepare
    from runtime.components.tokenizer import TextCodec

    repeats = 2 if quick else 4
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(os.path.join(tmp, "tok"))
        codec = TextCodec.from_path(tokenizer)
        corpus = os.path.join(tmp, "corpus.jsonl")
        size = write_corpus(corpus, 8)
        with open(corpus) as f:
            texts = [json.loads(line)["text"] for line in f]

        def baseline() -> None:  # the library's own multi-threaded batch encoding, all cores
            codec.tokenizer.encode_batch(texts, add_special_tokens=False)

        def baseline_fast() -> None:  # the same without offsets (what prepare's workers call)
            codec.tokenizer.encode_batch_fast(texts, add_special_tokens=False)

        def ours() -> None:  # read, parse, check, tokenize in workers, append EOS, write shards
            out = os.path.join(tmp, f"ds-{time.monotonic_ns()}")
            prepare([corpus], codec, tokenizer, out, Settings(workers=os.cpu_count() or 1))

        times = interleaved_medians(
            {"encode_batch": baseline, "encode_batch_fast": baseline_fast, "prepare": ours}, repeats
        )
        ratio = times["prepare"] / times["encode_batch"]
        figures["prepare_seconds"] = times["prepare"]
        figures["encode_batch_seconds"] = times["encode_batch"]
        figures["encode_batch_fast_seconds"] = times["encode_batch_fast"]
        figures["corpus_bytes"] = size
        targets = [
            Target(
                "data prepare time / tokenizers encode_batch (same JSONL)",
                ratio,
                1.3,
                higher_is_better=False,
                detail=f"{size / 1e6:.1f} MB JSONL, {len(texts):,} documents: prepare "
                f"{times['prepare']:.2f} s (parse, {os.cpu_count()} workers, EOS, shards written), "
                f"encode_batch {times['encode_batch']:.2f} s (texts in memory, {os.cpu_count()} threads; "
                f"encode_batch_fast, no offsets: {times['encode_batch_fast']:.2f} s)",
            )
        ]
        # peak memory for a corpus 8x the size: flat, because it streams
        big = os.path.join(tmp, "big.jsonl")
        write_corpus(big, 64)
        small_mb = _peak_mb(corpus, tokenizer, os.path.join(tmp, "peak-small"))
        big_mb = _peak_mb(big, tokenizer, os.path.join(tmp, "peak-big"))
        figures.update(peak_mb_8mb=small_mb, peak_mb_64mb=big_mb)
        targets.append(
            Target(
                "data prepare peak memory growth, 8 MB -> 64 MB corpus (MB)",
                big_mb - small_mb,
                150,
                higher_is_better=False,
                unit="MB",
                detail=f"peak RSS main + 2 workers: 8 MB corpus {small_mb:.0f} MB, 64 MB corpus {big_mb:.0f} MB",
            )
        )
        targets.append(_loader_share(tmp, corpus, tokenizer, figures, quick))
    return {"figures": figures, "targets": targets}


def _loader_share(tmp: str, corpus: str, tokenizer: str, figures: dict, quick: bool) -> Target:
    """Time of the loader (the step's micro-batches from two sources) over a whole training step
    (forward, backward, optimizer) of the tiny config's model, document masking on."""
    import torch

    from generated.parser import resolve
    from runtime.components.data.prepare import Settings, prepare
    from runtime.components.tokenizer import TextCodec
    from runtime.trainer.trainer import Trainer

    codec = TextCodec.from_path(tokenizer)
    halves = []
    with open(corpus) as f:
        lines = f.readlines()
    for i, part in enumerate((lines[::2], lines[1::2])):
        path = os.path.join(tmp, f"half{i}.jsonl")
        with open(path, "w") as f:
            f.writelines(part)
        out = os.path.join(tmp, f"source{i}")
        prepare([path], codec, tokenizer, out, Settings(workers=1))
        halves.append(out)
    sources = f"[{{path: {halves[0]}, weight: 0.7}}, {{path: {halves[1]}, weight: 0.3}}]"
    steps = 6 if quick else 16
    resolved = resolve(
        str(REPO / "configs" / "tiny.yaml"),
        argv=["--out_dir", os.path.join(tmp, "run"), "--data.sources", sources,
              "--data.document_mask", "true", "--model.vocab_size", "4096",
              "--training.max_iters", str(steps), "--sample.max_new_tokens", "0",
              "--evaluator.eval_interval", "1000", "--checkpointer.save_interval", "0"],
    )  # fmt: skip
    trainer = Trainer(resolved.config, resolved)
    batches = trainer.data.train_steps(steps)
    load, step = [], []
    for s in range(steps):
        start = time.perf_counter()
        micro = next(batches)
        middle = time.perf_counter()
        trainer.train_step(s, micro)
        end = time.perf_counter()
        if s >= 2:  # after warm-up
            load.append(middle - start)
            step.append(end - middle)
    share = sum(load) / (sum(load) + sum(step))
    figures.update(
        loader_ms_per_step=1e3 * sum(load) / len(load), step_ms=1e3 * sum(step) / len(step)
    )
    del torch
    return Target(
        "data loader share of a training step (2 sources, document masks)",
        100 * share,
        5,
        higher_is_better=False,
        unit="%",
        detail=f"loader {figures['loader_ms_per_step']:.2f} ms, step {figures['step_ms']:.0f} ms "
        f"(tiny config: batch 16 x 128, vocab 4096; a 0.7 / 0.3 mixture)",
    )


if __name__ == "__main__":
    print(json.dumps(run(quick=True)["figures"], indent=2))
