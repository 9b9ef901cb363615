"""`deepseek-moe data prepare INPUT... --tokenizer SRC --out DIR`: a corpus tokenized once into a
dataset folder that training reads as it is (`data.sources`).

Inputs, files or folders of them (walked in sorted order, hidden entries skipped):
  *.jsonl, *.jsonl.gz, *.ndjson   one JSON object per line, its text under `--text-field`
  *.parquet                       one row per document, the `--text-field` column (pyarrow)
  any other file                  one document: the whole file, UTF-8

Each document is tokenized (worker processes, each with the tokenizer) and its EOS id appended, so
documents stay apart in the token stream. The folder holds:

  shard-00000.bin / .idx ...  token shards of at most `--shard-tokens` tokens (whole documents), in
                              Megatron-LM's indexed format (indexed.py): uint16 or int32 ids,
                              chosen from the vocabulary, and a per-document index
  val-00000.bin / .idx ...    the held-out documents (`--val-fraction` of them, chosen by a hash
                              of each document's position in the inputs: spread over the corpus)
  tokenizer.json (+ tokenizer_config.json)  the tokenizer, so the folder describes itself
  manifest.json               format version, inputs (path, bytes, mtime, sha256), tokenizer
                              (source, sha256, vocabulary, special ids), counts, shards; written last

It streams: the inputs are read a chunk at a time and each shard is written as it fills, so memory
does not grow with the corpus. It is atomic: everything goes to a temporary folder beside DIR that
is renamed to DIR at the end, so an interrupted prepare leaves nothing that looks complete. It is
idempotent: when DIR's manifest records the same inputs (paths, sizes, modification times), the
same tokenizer and the same settings, nothing is redone.

Bad records are reported as `file:line: what was wrong` (invalid JSON, a missing or non-string text
field, bytes that are not UTF-8, an unreadable file). By default the first MAX_SHOWN are listed,
the rest counted, and nothing is written (exit 2); with `skip_bad` they are skipped and counted.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np

from runtime.components.data.indexed import IndexedWriter, token_dtype
from runtime.components.tokenizer import TextCodec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
CHUNK_BYTES = 1 << 20  # raw input per task sent to a worker
MAX_SHOWN = 50


class PrepareError(ValueError):
    """The inputs or settings cannot be prepared as asked (the message says what and where): bad
    input, exit 2."""


@dataclass
class Problem:
    where: str  # file:line (or file)
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Settings:
    text_field: str = "text"
    shard_tokens: int = 1 << 28  # 256M tokens (512 MB of uint16)
    val_fraction: float = 0.005
    skip_bad: bool = False
    workers: int = 0  # 0: one per CPU


@dataclass
class Counts:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    skipped: int = 0

    def add(self, other: Counts) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.text_bytes += other.text_bytes
        self.skipped += other.skipped


# ---------------------------------------------------------------------------------------------
# inputs


def input_files(paths: list[str]) -> list[str]:
    """The files named, folders walked in sorted order (hidden entries skipped); PrepareError for
    a path that does not exist."""
    files: list[str] = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [
                    os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith(".")
                ]
        else:  # a missing input is bad input (exit 2), as for every command
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    if not files:
        raise PrepareError(f"no input files in {', '.join(paths)}")
    return files


def fingerprint(path: str) -> dict[str, Any]:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# A task: (file index, first line number, kind, payload, input bytes). Payload: raw JSONL lines
# (bytes), or a list of texts (parquet rows, a text file), so workers do the parsing and the
# tokenizing.
Task = tuple[int, int, str, Any, int]


def _jsonl_tasks(index: int, path: str, sha: Any) -> Iterator[Task]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        lines: list[bytes] = []
        first, size = 1, 0
        for number, line in enumerate(f, start=1):
            sha.update(line)
            lines.append(line)
            size += len(line)
            if size >= CHUNK_BYTES:
                yield index, first, "jsonl", lines, size
                lines, first, size = [], number + 1, 0
        if lines:
            yield index, first, "jsonl", lines, size


def _parquet_tasks(index: int, path: str, text_field: str, sha: Any) -> Iterator[Task]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(
            f"{path}: reading parquet needs pyarrow (pip install -e '.[data]' or make setup)"
        ) from None
    with open(path, "rb") as raw:  # the fingerprint of the file's bytes
        while block := raw.read(CHUNK_BYTES):
            sha.update(block)
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise PrepareError(
            f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})"
        )
    rows, size = max(1, parquet.metadata.num_rows), os.path.getsize(path)
    row = 1
    for batch in parquet.iter_batches(batch_size=4096, columns=[text_field]):
        values = batch.column(0).to_pylist()
        yield index, row, "rows", values, size * len(values) // rows
        row += len(values)


def _text_tasks(index: int, path: str, sha: Any) -> Iterator[Task]:
    with open(path, "rb") as f:
        raw = f.read()
    sha.update(raw)
    yield index, 1, "file", [raw], len(raw)


# ---------------------------------------------------------------------------------------------
# workers: parse, check, tokenize

_codec: TextCodec | None = None
_text_field = "text"


def _init_worker(
    tokenizer_json: str, kind: str, eos_id: int, text_field: str, pooled: bool
) -> None:
    """Load the tokenizer once per process. In a pool each worker encodes on one thread: the
    processes are the parallelism (set before the tokenizer's first batch starts its threads)."""
    global _codec, _text_field
    if pooled:
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _codec = TextCodec.from_json(kind, tokenizer_json, eos_id=eos_id)
    _text_field = text_field


def _documents(task: Task, names: list[str]) -> tuple[list[str], list[Problem]]:
    index, first, kind, payload, _ = task
    name = names[index]
    texts: list[str] = []
    problems: list[Problem] = []
    if kind == "jsonl":
        for offset, raw in enumerate(payload):
            where = f"{name}:{first + offset}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                problems.append(Problem(where, f"bytes that are not UTF-8 (at byte {error.start})"))
                continue
            if not line.strip():
                continue  # blank lines are no records
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(Problem(where, f"invalid JSON: {error.msg} (column {error.colno})"))
                continue
            if not isinstance(record, dict) or _text_field not in record:
                problems.append(Problem(where, f"no {_text_field!r} field"))
                continue
            text = record[_text_field]
            if not isinstance(text, str):
                problems.append(
                    Problem(where, f"{_text_field!r} is {type(text).__name__}, not a string")
                )
                continue
            texts.append(text)
    elif kind == "rows":
        for offset, text in enumerate(payload):
            if not isinstance(text, str):
                what = "null" if text is None else type(text).__name__
                problems.append(
                    Problem(f"{name}:row {first + offset}", f"{_text_field!r} is {what}")
                )
                continue
            texts.append(text)
    else:  # a whole text file
        try:
            texts.append(payload[0].decode("utf-8"))
        except UnicodeDecodeError as error:
            problems.append(
                Problem(
                    f"{name}", f"bytes that are not UTF-8 (at byte {error.start}): not a text file"
                )
            )
    return texts, problems


# (task, tokens of its documents back to back, lengths, problems, UTF-8 bytes of the texts)
Result = tuple[Task, np.ndarray, np.ndarray, list[Problem], int]


def _tokenize(args: tuple[Task, list[str]]) -> Result:
    """-> (task, tokens of its documents back to back (each ending with EOS), lengths, problems,
    UTF-8 bytes of the texts)."""
    task, names = args
    assert _codec is not None and _codec.eos_id is not None  # _init_worker ran
    texts, problems = _documents(task, names)
    if not texts:
        return task, np.zeros(0, np.int64), np.zeros(0, np.int64), problems, 0
    encodings = _codec.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(texts))
    tokens = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    for e, end, n in zip(encodings, ends, lengths):
        tokens[end - n : end - 1] = e.ids
    tokens[ends - 1] = _codec.eos_id
    return task, tokens, lengths, problems, sum(len(t.encode("utf-8")) for t in texts)


# ---------------------------------------------------------------------------------------------
# the dataset folder


def _held_out(ordinals: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each document (by its position in the inputs) is held out for validation: a
    hash of the position below `fraction`, so held-out documents spread over the corpus and the
    choice does not depend on anything but the inputs."""
    if fraction <= 0:
        return np.zeros(len(ordinals), dtype=bool)
    x = ordinals.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


class _Shards:
    """Shards named `{stem}-NNNNN` of at most `limit` tokens each, whole documents."""

    def __init__(self, folder: str, stem: str, dtype: np.dtype, limit: int) -> None:
        self.folder, self.stem, self.dtype, self.limit = folder, stem, dtype, limit
        self.done: list[dict[str, Any]] = []
        self.writer: IndexedWriter | None = None
        self.docs = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        ends = np.cumsum(lengths)
        start_doc, start_tok = 0, 0
        while start_doc < len(lengths):
            if self.writer is None:
                name = f"{self.stem}-{len(self.done):05d}"
                self.writer = IndexedWriter(os.path.join(self.folder, name), self.dtype)
            room = self.limit - self.writer.n_tokens
            # whole documents that fit (at least one in an empty shard)
            fit = int(np.searchsorted(ends[start_doc:] - start_tok, room, side="right"))
            if fit == 0 and self.writer.n_tokens == 0:
                fit = 1
            if fit == 0:
                self.finish()
                continue
            stop_tok = int(ends[start_doc + fit - 1])
            self.writer.add_documents(
                tokens[start_tok:stop_tok], lengths[start_doc : start_doc + fit]
            )
            self.docs += fit
            start_doc, start_tok = start_doc + fit, stop_tok
            if self.writer.n_tokens >= self.limit:
                self.finish()

    def finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        name = os.path.basename(self.writer.prefix)
        self.done.append({"prefix": name, "tokens": self.writer.n_tokens, "documents": self.docs})
        self.writer, self.docs = None, 0


def _same_manifest(out: str, wanted: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False

    def files(inputs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(i.get("path"), i.get("bytes"), i.get("mtime_ns")) for i in inputs]

    return (
        old.get("format_version") == wanted["format_version"]
        and old.get("settings") == wanted["settings"]
        and files(old.get("inputs", [])) == files(wanted["inputs"])
        and old.get("tokenizer", {}).get("sha256") == wanted["tokenizer"]["sha256"]
    )


@dataclass
class Report:
    out: str
    manifest: dict[str, Any]
    reused: bool
    problems: list[Problem] = field(default_factory=list)


def prepare(
    inputs: list[str],
    codec: TextCodec,
    tokenizer_source: str,
    out: str,
    settings: Settings,
    progress: Callable[[int, int, Counts], None] | None = None,
) -> Report:
    """Tokenize `inputs` into the dataset folder `out` (see the module doc). `progress(done
    bytes, total bytes, counts)` is called as chunks complete. PrepareError for unusable inputs
    or settings; bad records end in a Report with problems (and nothing written) unless
    settings.skip_bad."""
    if codec.eos_id is None:
        raise PrepareError(
            f"{tokenizer_source}: the tokenizer has no end-of-sequence token (tokenizer_config.json "
            f"eos_token); documents need one appended to stay apart (--eos-token names one)"
        )
    files = input_files(inputs)
    names = [os.path.relpath(f) for f in files]
    tokenizer_json = codec.to_json()
    wanted: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "inputs": [fingerprint(f) for f in files],
        "settings": {"text_field": settings.text_field, "shard_tokens": settings.shard_tokens,
                     "val_fraction": settings.val_fraction, "skip_bad": settings.skip_bad},
        "tokenizer": {"sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest()},
    }  # fmt: skip
    if _same_manifest(out, wanted):
        with open(os.path.join(out, MANIFEST)) as f:
            return Report(out, json.load(f), reused=True)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        report = _write(files, names, codec, tokenizer_json, tokenizer_source, tmp, settings,
                        wanted, progress)  # fmt: skip
        if report.problems and not settings.skip_bad:
            shutil.rmtree(tmp, ignore_errors=True)
            report.out = out
            return report
        old = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.old-{os.getpid()}")
        if os.path.exists(out):
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        report.out = out
        return report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tasks(files: list[str], settings: Settings, shas: list[Any]) -> Iterator[Task]:
    for index, path in enumerate(files):
        lower = path.lower()
        if lower.endswith(JSONL_SUFFIXES):
            yield from _jsonl_tasks(index, path, shas[index])
        elif lower.endswith(PARQUET_SUFFIXES):
            yield from _parquet_tasks(index, path, settings.text_field, shas[index])
        else:
            yield from _text_tasks(index, path, shas[index])


def _write(
    files: list[str],
    names: list[str],
    codec: TextCodec,
    tokenizer_json: str,
    tokenizer_source: str,
    tmp: str,
    settings: Settings,
    wanted: dict[str, Any],
    progress: Callable[[int, int, Counts], None] | None,
) -> Report:
    dtype = token_dtype(codec.vocab_size)
    train = _Shards(tmp, "shard", dtype, settings.shard_tokens)
    val = _Shards(tmp, "val", dtype, settings.shard_tokens)
    counts = {"train": Counts(), "val": Counts()}
    problems: list[Problem] = []
    n_problems = 0
    shas = [hashlib.sha256() for _ in files]
    total = sum(i["bytes"] for i in wanted["inputs"])
    done_bytes, ordinal = 0, 0
    workers = settings.workers or os.cpu_count() or 1
    assert codec.eos_id is not None  # prepare() checked
    init = (tokenizer_json, codec.kind, codec.eos_id, settings.text_field, workers > 1)
    tasks = ((task, names) for task in _tasks(files, settings, shas))
    results: Iterator[Result]
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(get_context("fork").Pool(workers, _init_worker, init))
            results = pool.imap(_tokenize, tasks, chunksize=1)
        else:
            _init_worker(*init)
            results = map(_tokenize, tasks)
        for task, tokens, lengths, bad, text_bytes in results:
            n_problems += len(bad)
            problems += bad[: max(0, MAX_SHOWN - len(problems))]
            held = _held_out(np.arange(ordinal, ordinal + len(lengths)), settings.val_fraction)
            ordinal += len(lengths)
            for part, keep in (("train", ~held), ("val", held)):
                if not keep.any():
                    continue
                sel = np.repeat(keep, lengths)
                shards = train if part == "train" else val
                shards.add(tokens[sel], lengths[keep])
                c = counts[part]
                c.documents += int(keep.sum())
                c.tokens += int(lengths[keep].sum())
            counts["train"].text_bytes += text_bytes  # both parts: bytes per token is a ratio
            counts["train"].skipped += len(bad)
            done_bytes += task[4]
            if progress is not None:
                progress(done_bytes, total, counts["train"])
    train.finish()
    val.finish()
    report = Report(tmp, {}, reused=False, problems=problems)
    if n_problems > len(problems):
        report.problems.append(Problem("...", f"and {n_problems - len(problems)} more"))
    if counts["train"].documents == 0:
        raise PrepareError(f"no documents in {', '.join(sorted(set(names)))}")
    for i, sha in enumerate(shas):
        wanted["inputs"][i]["sha256"] = sha.hexdigest()
    codec.save_hf(tmp)
    all_tokens = counts["train"].tokens + counts["val"].tokens
    manifest = {
        **wanted,
        "tokenizer": {
            **wanted["tokenizer"], "source": tokenizer_source, "vocab_size": codec.vocab_size,
            "bos_id": codec.bos_id, "eos_id": codec.eos_id, "pad_id": codec.pad_id,
        },
        "dtype": dtype.name,
        "documents": counts["train"].documents + counts["val"].documents,
        "tokens": all_tokens,
        "text_bytes": counts["train"].text_bytes,
        "bytes_per_token": counts["train"].text_bytes / max(1, all_tokens),
        "skipped_records": n_problems if settings.skip_bad else 0,
        "train": {"documents": counts["train"].documents, "tokens": counts["train"].tokens,
                  "shards": train.done},
        "validation": {"documents": counts["val"].documents, "tokens": counts["val"].tokens,
                       "shards": val.done},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    report.manifest = manifest
    return report
