"""Corpora, splits and the deterministic, resumable, rank-sliced loader."""

import os
import sysconfig

import numpy as np
import pytest
import torch

from generated.config import DataConfig
from generated.parser import ConfigError, load_config
from runtime.components.data import corpus as data_mod
from runtime.components.data.corpus import load_corpus, split_ranges
from runtime.components.data.errors import DataError
from runtime.components.data.module import DataModule
from runtime.components.data.sampling import BatchPlan
from runtime.configlib.quantities import BatchRamp


def make(data, window=9, batch_size=2, grad_accum=2, world_size=1, rank=0, seed=7):
    return DataModule(
        data,
        seed=seed,
        window=window,
        batch_size=batch_size,
        grad_accum=grad_accum,
        world_size=world_size,
        rank=rank,
    )


def steps(module, start, end):
    loader = iter(module.train_loader(start, end))
    return [[next(loader) for _ in range(module.plan.micro_per_rank(s))] for s in range(start, end)]


def test_stdlib_corpus_is_the_sorted_stdlib_sources_cached(data_dir, monkeypatch):
    corpus = load_corpus(DataConfig(data_dir=data_dir))
    assert (
        corpus.path == os.path.join(data_dir, "stdlib.bin")
        and corpus.is_bytes
        and corpus.dtype == "uint8"
    )
    root, files = data_mod._stdlib_files()
    assert root == os.path.realpath(sysconfig.get_paths()["stdlib"])
    assert files == sorted(files) and all(f.endswith(".py") for f in files)
    assert not any(
        part in data_mod.STDLIB_EXCLUDED_DIRS for f in files for part in f.split(os.sep)[:-1]
    )
    with open(os.path.join(root, files[0]), "rb") as f:
        first = f.read()
    assert bytes(corpus.array()[: len(first)]) == first
    assert corpus.length == sum(os.path.getsize(os.path.join(root, f)) for f in files)
    assert not [n for n in os.listdir(data_dir) if n.endswith(".tmp")]
    # reused, not rebuilt
    mtime = os.stat(corpus.path).st_mtime_ns
    monkeypatch.setattr(data_mod, "atomic_write_chunks", lambda *a: pytest.fail("cache rebuilt"))
    assert load_corpus(DataConfig(data_dir=data_dir)) == corpus
    assert os.stat(corpus.path).st_mtime_ns == mtime


def test_text_dir_sorted_text_files_only(tmp_path):
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "b" / "z.txt").write_text("ZZ")
    (src / "a.md").write_text("AA")
    (src / "b" / "c.txt").write_text("CC")
    (src / "blob.bin").write_bytes(b"\x00\x01\xff")  # not text
    (src / ".hidden").write_text("HH")
    cache = tmp_path / "cache"
    corpus = load_corpus(DataConfig(dataset="text_dir", path=str(src), data_dir=str(cache)))
    assert bytes(corpus.array()) == b"AACCZZ"
    assert os.path.exists(cache / "text_dir.bin")
    # a changed source rebuilds the cache
    (src / "b" / "c.txt").write_text("CCC")
    assert (
        bytes(
            load_corpus(DataConfig(dataset="text_dir", path=str(src), data_dir=str(cache))).array()
        )
        == b"AACCCZZ"
    )


def test_bin_dataset_is_uint16_memmap(tmp_path):
    tokens = (np.arange(1000) * 37 % 50000).astype(np.uint16)
    path = tmp_path / "tok.bin"
    tokens.tofile(path)
    data = DataConfig(
        dataset="bin",
        path=str(path),
        data_dir=str(tmp_path / "unused"),
        train_split=0.5,
        val_split=0.5,
    )
    corpus = load_corpus(data)
    assert corpus.dtype == "uint16" and corpus.length == 1000 and not corpus.is_bytes
    module = make(data, window=9)
    for window in steps(module, 0, 3)[0]:
        assert window.dtype == torch.int64 and window.shape == (2, 9)
        for row in window.numpy():  # a contiguous stretch of the file
            start = int(np.nonzero(tokens == row[0])[0][0])
            assert (tokens[start : start + 9] == row).all()
    assert not os.path.exists(tmp_path / "unused" / "bin.bin")


def test_errors(tmp_path):
    with pytest.raises(DataError, match="text_dir"):
        load_corpus(
            DataConfig(dataset="text_dir", path=str(tmp_path / "missing"), data_dir=str(tmp_path))
        )
    with pytest.raises(DataError, match="bin"):
        load_corpus(
            DataConfig(dataset="bin", path=str(tmp_path / "missing.bin"), data_dir=str(tmp_path))
        )
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "small.bin")
    with pytest.raises(DataError, match="fewer than one window"):
        make(DataConfig(dataset="bin", path=str(tmp_path / "small.bin")), window=9)
    with pytest.raises(DataError, match="divide"):
        BatchPlan(BatchRamp(seq_len=8, full=3), batch_size=1, world_size=2)


def test_splits_from_start_and_end():
    data = DataConfig(train_split=0.7, val_split=0.2)
    assert split_ranges(1000, data) == ((0, 700), (800, 1000))


def test_windows_stay_in_their_split(tmp_path):
    tokens = np.arange(2000, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    data = DataConfig(dataset="bin", path=str(tmp_path / "t.bin"), train_split=0.8, val_split=0.2)
    module = make(data, window=5, batch_size=8)
    train = torch.cat([w for s in steps(module, 0, 20) for w in s])
    val = torch.cat(list(module.val_loader(10)))
    assert train.max() < 1600 and val.min() >= 1600
    assert (train[:, 1:] - train[:, :-1] == 1).all()


def test_deterministic_and_resumable(data_dir):
    data = DataConfig(data_dir=data_dir)
    full = steps(make(data), 0, 6)
    again = steps(make(data), 0, 6)
    resumed = steps(make(data), 3, 6)
    for a, b in zip(full, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for a, b in zip(full[3:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(full[0][0], full[1][0])
    other_seed = steps(make(data, seed=8), 0, 1)
    assert not torch.equal(full[0][0], other_seed[0][0])
    # workers give the same batches
    workers = DataModule(
        DataConfig(data_dir=data_dir, num_workers=1, pin_memory=False),
        seed=7,
        window=9,
        batch_size=2,
        grad_accum=2,
    )
    loader = workers.train_loader(0, 2)
    assert loader.num_workers == 1
    got = list(loader)
    assert all(torch.equal(x, y) for x, y in zip(got, [w for s in full[:2] for w in s]))


def test_ranks_take_disjoint_slices_of_the_global_batch(data_dir):
    data = DataConfig(data_dir=data_dir)
    single = steps(make(data, grad_accum=4), 0, 3)
    rank0 = steps(make(data, grad_accum=4, world_size=2, rank=0), 0, 3)
    rank1 = steps(make(data, grad_accum=4, world_size=2, rank=1), 0, 3)
    for s in range(3):
        assert len(rank0[s]) == len(rank1[s]) == 2
        for x, y in zip(single[s], rank0[s] + rank1[s]):
            assert torch.equal(x, y)


def test_fixed_validation_batches(data_dir):
    module = make(DataConfig(data_dir=data_dir))
    first, second = list(module.val_loader(3)), list(module.val_loader(3))
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, second))
    halves = list(make(DataConfig(data_dir=data_dir), world_size=2, rank=0).val_loader(3))
    halves += list(make(DataConfig(data_dir=data_dir), world_size=2, rank=1).val_loader(3))
    assert len(halves) == 3  # rank 0 takes batches 0 and 2, rank 1 batch 1
    assert (
        torch.equal(halves[0], first[0])
        and torch.equal(halves[1], first[2])
        and torch.equal(halves[2], first[1])
    )


def test_even_validation_batches_pad_with_uncounted_repeats(data_dir):
    # sharded runs: 3 batches over 2 processes, both run 2 forwards; rank 1's second is uncounted
    first = list(make(DataConfig(data_dir=data_dir)).val_loader(3))
    loaders = [
        make(DataConfig(data_dir=data_dir), world_size=2, rank=r).val_loader(3, even=True)
        for r in (0, 1)
    ]
    batches = [list(loader) for loader in loaders]
    assert [len(b) for b in batches] == [2, 2]
    assert [loader.batch_sampler.counted for loader in loaders] == [2, 1]
    assert torch.equal(batches[0][1], first[2]) and torch.equal(batches[1][0], first[1])
    assert torch.equal(batches[1][1], first[0])  # the padding repeat: batch 0, not counted
    # 4 processes, 3 batches: the last process counts none and still runs one forward
    last = make(DataConfig(data_dir=data_dir), grad_accum=4, world_size=4, rank=3)
    last = last.val_loader(3, even=True)
    assert len(list(last)) == 1 and last.batch_sampler.counted == 0


def test_loader_does_not_touch_the_global_torch_rng(data_dir):
    module = make(DataConfig(data_dir=data_dir))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(module.val_loader(2))
    next(iter(module.train_loader(0, 1)))
    assert torch.equal(torch.rand(3), expected)


def test_bin_dataset_uint32_tokens_beyond_uint16(tmp_path):
    # DeepSeek-V3's vocabulary (129,280) needs uint32 tokens
    tokens = (np.arange(3000, dtype=np.int64) * 97 % 129280).astype(np.uint32)
    tokens.tofile(tmp_path / "t32.bin")
    cfg = load_config(
        argv=[
            "--data.dataset",
            "bin",
            "--data.path",
            str(tmp_path / "t32.bin"),
            "--data.token_dtype",
            "uint32",
            "--model.vocab_size",
            "129280",
        ]
    )
    corpus = load_corpus(cfg.data)
    assert corpus.dtype == "uint32" and corpus.length == 3000
    assert corpus.array()[:5].tolist() == tokens[:5].tolist() and int(corpus.array().max()) > 65535
    (tmp_path / "odd.bin").write_bytes(b"\0" * 6)
    bad = load_config(
        argv=[
            "--data.dataset",
            "bin",
            "--data.path",
            str(tmp_path / "odd.bin"),
            "--data.token_dtype",
            "uint32",
        ]
    )
    with pytest.raises(DataError, match="divisible by 4"):
        load_corpus(bad.data)
    with pytest.raises(ConfigError, match="token_dtype"):
        load_config(
            argv=["--data.dataset", "bin", "--data.path", "x", "--model.vocab_size", "129280"]
        )
