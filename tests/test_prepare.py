"""`deepseek-moe data prepare` / `inspect`, Megatron's indexed format and the mixture's sampling
arithmetic: every input kind, one EOS per document, bounded shards, a manifest, idempotent and
atomic writes, bad records by file:line, and the exact weighted interleave and per-epoch
permutations the trainer samples with."""

import gzip
import json
import os
import struct
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runtime.cli import data as data_cli
from runtime.components.data import prepare as prepare_mod
from runtime.components.data.indexed import (
    HEADER,
    IndexedDataset,
    IndexedFormatError,
    IndexedWriter,
    token_dtype,
)
from runtime.components.data.mixture import Interleave, Permutation
from runtime.components.data.prepare import MANIFEST, Settings, prepare
from runtime.components.data.sources import SourceError, check_ids, hold_out_tail, open_source
from runtime.components.tokenizer import TextCodec

TEXTS = [f"doc {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5) for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE of a few hundred ids with an end-of-sequence token, as a Hugging Face
    folder (tokenizer.json + tokenizer_config.json naming eos_token)."""
    codec = TextCodec.train_bpe(TEXTS, 300)
    codec.tokenizer.add_special_tokens(["<eos>"])
    codec.eos_id = codec.tokenizer.token_to_id("<eos>")
    codec.kind = "pretrained"
    folder = tmp_path_factory.mktemp("tok")
    codec.save_hf(str(folder))
    return str(folder)


def write_inputs(folder, texts=TEXTS):
    """JSONL, gzipped JSONL, parquet and plain text files holding `texts` in this order."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "a.jsonl"), "w") as f:
        for t in texts[:50]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    with gzip.open(os.path.join(folder, "b.jsonl.gz"), "wt") as f:
        for t in texts[50:80]:
            f.write(json.dumps({"text": t}) + "\n")
    pq.write_table(pa.table({"text": texts[80:110]}), os.path.join(folder, "c.parquet"))
    for i, t in enumerate(texts[110:]):
        with open(os.path.join(folder, f"d{i:02d}.txt"), "w") as f:
            f.write(t)
    return folder


def documents(shard):
    return [
        np.asarray(shard.tokens[a:b]) for a, b in zip(shard.doc_starts[:-1], shard.doc_starts[1:])
    ]


# ----------------------------------------------------------------------------- indexed format


def test_a_megatron_index_written_by_hand_reads_as_megatron_means_it(tmp_path):
    # two documents, the first of two sequences (as --split-sentences writes), int32 tokens
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    tokens = np.array([t for s in seqs for t in s], dtype=np.int32)
    (tmp_path / "m.bin").write_bytes(tokens.tobytes())
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    pointers = np.array([0, 12, 20], dtype=np.int64)  # bytes
    doc_index = np.array([0, 2, 3], dtype=np.int64)
    index = HEADER + struct.pack("<Q", 1) + bytes([4]) + struct.pack("<QQ", 3, 3)
    (tmp_path / "m.idx").write_bytes(
        index + lengths.tobytes() + pointers.tobytes() + doc_index.tobytes()
    )
    ds = IndexedDataset.open(str(tmp_path / "m"))
    assert ds.tokens.dtype == np.int32 and ds.n_documents == 2 and ds.n_tokens == 9
    assert [d.tolist() for d in documents(ds)] == [[5, 6, 7, 8, 9], [10, 11, 12, 13]]
    # the source names it with or without the extension
    assert open_source(str(tmp_path / "m.bin")).kind == "megatron"
    (tmp_path / "m.idx").write_bytes(b"NOTANIDX" + index[8:])
    with pytest.raises(IndexedFormatError, match=r"m\.idx: not a Megatron index"):
        IndexedDataset.open(str(tmp_path / "m"))


def test_writer_round_trips_and_picks_the_dtype_from_the_vocabulary(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    writer = IndexedWriter(str(tmp_path / "w"), np.dtype(np.int32))
    writer.add_documents(np.array([1, 2, 3, 70000, 5]), np.array([3, 2]))
    writer.close()
    ds = IndexedDataset.open(str(tmp_path / "w"))
    assert [d.tolist() for d in documents(ds)] == [[1, 2, 3], [70000, 5]]
    assert (tmp_path / "w.idx").read_bytes()[17] == 4  # Megatron's code for int32


# ----------------------------------------------------------------------------- mixture arithmetic


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1], [1, 2, 3], [0.001, 1]])
def test_interleave_is_the_exact_merge_of_every_sources_ticks(weights):
    mix = Interleave(weights)
    ticks = sorted((Fraction(2 * k + 1, 2 * w), s) for s, w in enumerate(mix.w) for k in range(400))
    order = [s for _, s in ticks[:400]]
    for m in (0, 1, 7, 100, 399):
        assert mix.counts(m) == [order[:m].count(s) for s in range(len(weights))]
    assert [mix.locate(i)[0] for i in range(400)] == order  # sequential
    assert Interleave(weights).locate(123) == (order[123], order[:123].count(order[123]))  # direct
    # far into a run: every source within one sample of its share
    m = 10**12 + 7
    for s, c in enumerate(mix.counts(m)):
        assert abs(c - m * weights[s] / sum(weights)) <= 1


def test_the_permutation_reads_every_window_once_per_epoch_in_a_new_order():
    for n in (1, 2, 7, 1000):
        assert sorted(Permutation(n, seed=1, source=0, epoch=0)(i) for i in range(n)) == list(
            range(n)
        )
    a = [Permutation(1000, 1, 0, 0)(i) for i in range(1000)]
    b = [Permutation(1000, 1, 0, 1)(i) for i in range(1000)]
    assert a != b and a != list(range(1000))


# ----------------------------------------------------------------------------- prepare


def test_every_input_kind_becomes_documents_each_ending_with_eos(tmp_path, tokenizer):
    inputs = write_inputs(tmp_path / "in")
    codec = TextCodec.from_path(tokenizer)
    report = prepare(
        [str(inputs)], codec, tokenizer, str(tmp_path / "ds"), Settings(val_fraction=0.1, workers=2)
    )
    m = report.manifest
    assert not report.problems and m["documents"] == len(TEXTS) and m["format_version"] == 1
    assert m["dtype"] == "uint16" and m["tokenizer"]["eos_id"] == codec.eos_id
    assert [os.path.basename(i["path"]) for i in m["inputs"]] == sorted(os.listdir(inputs))
    assert all(len(i["sha256"]) == 64 and i["bytes"] > 0 for i in m["inputs"])
    source = open_source(str(tmp_path / "ds"))
    train = [d for s in source.train.shards for d in documents(s)]
    val = [d for s in source.val.shards for d in documents(s)]
    assert len(train) + len(val) == len(TEXTS) and 0 < len(val) < len(TEXTS) // 4
    # whole documents, each with one EOS at its end, in input order on each side of the split
    decoded = [codec.decode(d[:-1]) for d in train + val]
    assert all(d[-1] == codec.eos_id and (d[:-1] != codec.eos_id).all() for d in train + val)
    assert sorted(decoded) == sorted(TEXTS) and decoded[: len(train)] == [
        t for t in TEXTS if t in decoded[: len(train)]
    ]
    held = [TEXTS.index(t) for t in decoded[len(train) :]]
    assert max(held) - min(held) > len(TEXTS) // 2  # spread over the corpus, not its tail
    # the folder describes itself: its tokenizer reads back with the same ids
    assert TextCodec.from_path(str(tmp_path / "ds")).same_ids_as(codec)


def test_shards_are_bounded_and_a_rerun_redoes_nothing_until_an_input_changes(tmp_path, tokenizer):
    inputs = write_inputs(tmp_path / "in")
    codec = TextCodec.from_path(tokenizer)
    out = str(tmp_path / "ds")
    settings = Settings(shard_tokens=200, val_fraction=0, workers=1)
    first = prepare([str(inputs)], codec, tokenizer, out, settings)
    shards = first.manifest["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] <= 200 for s in shards)
    stamp = os.stat(os.path.join(out, MANIFEST)).st_mtime_ns
    again = prepare([str(inputs)], codec, tokenizer, out, settings)
    assert again.reused and os.stat(os.path.join(out, MANIFEST)).st_mtime_ns == stamp
    with open(inputs / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    assert (
        prepare([str(inputs)], codec, tokenizer, out, settings).manifest["documents"]
        == len(TEXTS) + 1
    )


def test_an_interrupted_prepare_leaves_the_old_folder_and_no_new_one(
    tmp_path, tokenizer, monkeypatch
):
    inputs = write_inputs(tmp_path / "in")
    codec = TextCodec.from_path(tokenizer)
    out = tmp_path / "ds"
    prepare([str(inputs)], codec, tokenizer, str(out), Settings(workers=1))
    before = sorted(os.listdir(out))
    (inputs / "e.txt").write_text("a new document")

    def killed(self, tokens, lengths):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod._Shards, "add", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(inputs)], codec, tokenizer, str(out), Settings(workers=1))
    assert sorted(os.listdir(out)) == before and json.loads((out / MANIFEST).read_text())[
        "documents"
    ] == len(TEXTS)
    assert sorted(os.listdir(tmp_path)) == ["ds", "in"]  # no temporary folder left behind
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(prepare_mod._Shards, "add", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(inputs)], codec, tokenizer, str(fresh), Settings(workers=1))
    assert not fresh.exists()


class _Done:
    def __init__(self, returncode, out, err):
        self.returncode, self.stdout, self.stderr = returncode, out, err


@pytest.fixture
def cli(capsys):
    """`deepseek-moe data ...` in this process: exit code, stdout and stderr."""

    def run(*args):
        code = data_cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return _Done(code, captured.out, captured.err)

    return run


def test_bad_records_are_listed_by_file_and_line_and_nothing_is_written(tmp_path, tokenizer, cli):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "fine"}\n{bad json\n{"body": "x"}\n{"text": 5}\n\n')
    (bad / "b.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe not utf-8\n')
    (bad / "c.txt").write_bytes(b"text\x00\xff")
    result = cli(
        "prepare", bad, "--tokenizer", tokenizer, "--out", tmp_path / "out", "--workers", "1"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    err = result.stderr
    assert "\ndata prepare: error: bad records; nothing written" in "\n" + err
    for where, what in (("a.jsonl:2", "invalid JSON"), ("a.jsonl:3", "no 'text' field"),
                        ("a.jsonl:4", "'text' is int, not a string"), ("b.jsonl:2", "not UTF-8"),
                        ("c.txt", "not UTF-8")):  # fmt: skip
        assert any(where in line and what in line for line in err.splitlines()), (where, err)
    assert not (tmp_path / "out").exists()
    skipped = cli(
        "prepare",
        bad,
        "--tokenizer",
        tokenizer,
        "--out",
        tmp_path / "out",
        "--skip-bad",
        "--val-fraction",
        "0",
    )
    assert skipped.returncode == 0 and "skipped 5 bad records" in skipped.stdout
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["documents"] == 2 and manifest["skipped_records"] == 5
    missing = cli("prepare", tmp_path / "nope", "--tokenizer", tokenizer, "--out", tmp_path / "x")
    assert missing.returncode == 2 and "nope: no such file or folder" in missing.stderr
    no_eos = tmp_path / "no_eos"
    TextCodec.bytes().save_hf(str(no_eos))
    refused = cli("prepare", bad, "--tokenizer", no_eos, "--out", tmp_path / "y")
    assert refused.returncode == 2 and "no end-of-sequence token" in refused.stderr


def test_inspect_tells_documents_tokens_shards_tokenizer_and_samples(tmp_path, tokenizer, cli):
    inputs = write_inputs(tmp_path / "in")
    prepare(
        [str(inputs)],
        TextCodec.from_path(tokenizer),
        tokenizer,
        str(tmp_path / "ds"),
        Settings(workers=1),
    )
    result = cli("inspect", tmp_path / "ds", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["documents"] == len(TEXTS) and info["kind"] == "prepared"
    assert info["tokenizer"]["eos_id"] == TextCodec.from_path(tokenizer).eos_id
    assert info["samples"][0]["text"] == TEXTS[0] or info["samples"][0]["text"] in TEXTS
    plain = cli("inspect", tmp_path / "ds")
    assert "prepared dataset, 120 documents" in plain.stdout


# ----------------------------------------------------------------------------- sources


def test_a_megatron_prefix_holds_out_its_last_whole_documents_and_ids_are_checked(tmp_path):
    writer = IndexedWriter(str(tmp_path / "m"), np.dtype(np.uint16))
    writer.add_documents(np.arange(100) % 50, np.full(10, 10))
    writer.close()
    source = open_source(str(tmp_path / "m"))
    hold_out_tail(source, 0.25)
    (_, cut), (start, end) = source.train.ranges[0], source.val.ranges[0]
    assert cut == start and end == 100 and cut % 10 == 0 and 60 <= cut <= 80  # a document boundary
    check_ids(source, 50, str(tmp_path / "cache"))  # ids 0..49 fit 50
    with pytest.raises(
        SourceError, match=r"m\.bin: token 49 is id 49, outside the model's vocabulary of 49"
    ):
        check_ids(open_source(str(tmp_path / "m")), 49, None)
