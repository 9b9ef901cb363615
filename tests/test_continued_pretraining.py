"""Continued pretraining of a released checkpoint on your own corpus: the checkpoint's tokenizer
(bos / eos / pad ids included) through prepare, training, checkpoints and export; a weighted mixture
of prepared folders and Megatron prefixes, resumed bit-exactly; held-out documents; attention
masked per document; and the mistakes a new user made on the way, each now a clear behaviour."""

import json
import subprocess

import numpy as np
import pytest
import torch

from generated.config import DataConfig, DataSource
from generated.parser import ConfigError, load_config, resolve
from helpers import (
    CORPUS,
    ENV,
    PYTHON,
    REPO,
    TINY_RUN_FLAGS,
    debug_model_config,
    losses,
    make_tokenizer,
    metrics,
    run_trainer,
    torchrun_args,
    trainer_args,
    write_jsonl,
)
from runtime.cli import export as export_cli
from runtime.components.data.errors import DataError
from runtime.components.data.indexed import IndexedWriter
from runtime.components.data.module import DataModule
from runtime.components.data.prepare import Settings, prepare
from runtime.components.loss import TrainingLoss
from runtime.components.tokenizer import TextCodec
from runtime.interop.hf_folder import export_hf
from runtime.interop.sources import load_source
from runtime.models.deepseek_v3.model import Transformer
from runtime.trainer.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = "320"  # fits the test tokenizer's 302 ids


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A released checkpoint in miniature (a Hugging Face folder with its tokenizer, trained-ish
    weights) and a JSONL corpus prepared with that tokenizer into two dataset folders."""
    root = tmp_path_factory.mktemp("world")
    tokenizer = make_tokenizer(root / "tok")
    codec = TextCodec.from_path(tokenizer)
    cfg = load_config(argv=[*TINY_RUN_FLAGS, "--model.vocab_size", VOCAB]).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # not a fresh initialisation: its loss is its own
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    export_hf(model, str(root / "release"), tokenizer=codec)
    halves = []
    for i, texts in enumerate((CORPUS[::2], CORPUS[1::2])):
        jsonl = write_jsonl(root / f"part{i}.jsonl", texts)
        out = str(root / f"ds{i}")
        prepare([jsonl], codec, tokenizer, out, Settings(val_fraction=0.1, workers=1))
        halves.append(out)
    return {"root": root, "tokenizer": tokenizer, "release": str(root / "release"), "ds": halves,
            "codec": codec}  # fmt: skip


def mixture_flags(world, *extra):
    sources = f"[{{path: {world['ds'][0]}, weight: 0.7}}, {{path: {world['ds'][1]}, weight: 0.3}}]"
    return ("--model.vocab_size", VOCAB, "--data.sources", sources, "--data.document_mask", "true",
            *extra)  # fmt: skip


@pytest.mark.slow
def test_init_from_a_release_trains_from_its_own_loss_with_its_tokenizer_then_exports(
    world, tmp_path, data_dir
):
    out = tmp_path / "cpt"
    args = trainer_args(out, data_dir, *mixture_flags(world, "--checkpointer.init_from", world["release"],
                                                       "--training.max_iters", "3"))  # fmt: skip
    trainer = Trainer(load_config(argv=args))
    # the tokenizer comes from init_from's folder, special ids and all
    assert trainer.cfg.data.tokenizer == world["release"]
    assert (
        trainer.codec.same_ids_as(world["codec"]) and trainer.codec.eos_id == world["codec"].eos_id
    )
    # step 1's loss is the released model's own on that batch, not a fresh model's
    batch = next(DataModule(trainer.cfg.data, seed=trainer.cfg.seed, window=trainer.window,
                            batch_size=2, grad_accum=1, vocab_size=320, stride=16).train_steps(1))[0]  # fmt: skip
    loss = TrainingLoss(trainer.cfg.moe, trainer.cfg.mtp, world["codec"].eos_id)
    released = load_source(world["release"]).build_model()
    own = float(loss(released, batch, 0).main_loss)
    fresh = float(loss(Transformer(trainer.cfg.model).eval(), batch, 0).main_loss)
    assert trainer.run() == 0
    first = metrics(out)[0]
    assert first["main_loss"] == pytest.approx(own, abs=1e-5) and abs(fresh - own) > 0.01
    assert {"data/ds0/tokens", "data/ds1/epochs"} <= set(first)
    # the run folder, every checkpoint and the export carry the tokenizer
    assert TextCodec.from_path(str(out)).same_ids_as(world["codec"])
    export = tmp_path / "export"
    assert export_cli.main([str(out / "checkpoints" / "ckpt_0000003.pt"), str(export)]) == 0
    config = json.loads((export / "config.json").read_text())
    generation = json.loads((export / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == world["codec"].eos_id
    assert config["bos_token_id"] == world["codec"].bos_id

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(export))
    text = CORPUS[3]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == world["codec"].encode(text)
    assert tokenizer.eos_token == "<eos>" and tokenizer.eos_token_id == world["codec"].eos_id
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :8]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


@pytest.mark.slow
def test_a_two_source_mixture_resumes_bit_exactly_and_any_world_size_reads_one_batch(
    world, tmp_path, data_dir
):
    flags = mixture_flags(world, "--checkpointer.save_interval", "3", "--training.max_iters", "6")
    run_trainer(tmp_path / "straight", data_dir, *flags)
    run_trainer(tmp_path / "split", data_dir, *flags, "--training.max_iters", "3")
    run_trainer(tmp_path / "split", data_dir, *flags, "--checkpointer.resume_from", "latest")
    volatile = {"tokens_per_s", "time", "elapsed_s", "run_id"}

    def rows(out):  # every training row (the split run also evaluated at its first end)
        return [
            {k: v for k, v in r.items() if k not in volatile} for r in metrics(out) if "loss" in r
        ]

    straight, split = rows(tmp_path / "straight"), rows(tmp_path / "split")
    assert straight == split and len(losses(tmp_path / "straight")) == 6
    last = [r for r in straight if "loss" in r][-1]
    # 6 steps x 2 sequences: 12 samples, 0.7 / 0.3 by Sainte-Lague, 16 tokens each
    assert (last["data/ds0/tokens"], last["data/ds1/tokens"]) == (8 * 16, 4 * 16)
    cfg = load_config(
        argv=trainer_args(tmp_path / "w", data_dir, *flags, "--data.tokenizer", world["tokenizer"])
    ).data

    def micro(world_size, rank):
        data = DataModule(cfg, seed=1, window=17, batch_size=2, grad_accum=2, world_size=world_size,
                          rank=rank, vocab_size=320, stride=16)  # fmt: skip
        return torch.cat([b for step in data.train_steps(3) for b in step])

    one = micro(1, 0).view(3, 4, 17)
    two = torch.stack([micro(2, r).view(3, 2, 17) for r in range(2)], dim=1).view(3, 4, 17)
    assert torch.equal(one, two)


def test_validation_holds_out_whole_documents_or_reads_the_validation_source(world, tmp_path):
    codec = world["codec"]
    base = dict(tokenizer=world["tokenizer"], document_mask=True, data_dir=str(tmp_path))
    held = DataModule(DataConfig(sources=[DataSource(path=world["ds"][0])], **base), seed=0,
                      window=17, batch_size=2, grad_accum=1, vocab_size=320, stride=16)  # fmt: skip
    val_ids = {int(t) for b in held.val_loader(4) for t in b.flatten()}
    assert codec.eos_id in val_ids
    # a Megatron prefix (no held-out shards): its last whole documents, about val_split
    writer = IndexedWriter(str(tmp_path / "m"), np.dtype(np.uint16))
    docs = [codec.encode(t) + [codec.eos_id] for t in CORPUS[:60]]
    writer.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    writer.close()
    megatron = DataModule(DataConfig(sources=[DataSource(path=str(tmp_path / "m"))], val_split=0.2, **base),
                          seed=0, window=17, batch_size=2, grad_accum=1, vocab_size=320, stride=16)  # fmt: skip
    source = megatron.sources[0]
    boundary = source.val.ranges[0][0]
    assert boundary in set(source.train.shards[0].doc_starts.tolist())  # a document boundary
    assert source.train.ranges[0] == (0, boundary)
    # data.validation: that source, read whole
    separate = DataModule(
        DataConfig(sources=[DataSource(path=world["ds"][0])], validation=str(tmp_path / "m"), **base),
        seed=0, window=17, batch_size=2, grad_accum=1, vocab_size=320, stride=16,
    )  # fmt: skip
    first = next(iter(separate.val_loader(1)))[0]
    assert first.tolist() == source.train.shards[0].tokens[:17].astype(np.int64).tolist()


def _logits(model, tokens, eos):
    out = model(tokens, mtp=True, eos_id=eos)
    return out.logits[0], out.mtp_logits[0][0]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_tokens_logits_do_not_change_with_the_document_before_it(compiled):
    eos = 3
    torch.manual_seed(0)
    model = Transformer(debug_model_config(mtp_depth=1, max_seq_len=64)).eval()
    run = torch.compile(model) if compiled else model
    doc_b = [7, 8, 9, 10, 11, 12, 13, 14]
    first = torch.tensor([[20, 21, 22, 23, 24, eos, *doc_b, 30]])  # T = 14, one extra for MTP
    other = torch.tensor([[40, 41, eos, *doc_b, 30]])  # a shorter, different first document
    with torch.no_grad():
        main_a, mtp_a = _logits(run, first, eos)
        main_b, mtp_b = _logits(run, other, eos)
        unmasked_a = model(first, mtp=True).logits[0]
        unmasked_b = model(other, mtp=True).logits[0]
    # doc_b sits at positions 6..13 in `first` and 3..10 in `other`
    assert torch.allclose(main_a[6:14], main_b[3:11], atol=1e-5)
    assert torch.allclose(
        mtp_a[6:13], mtp_b[3:10], atol=1e-5
    )  # MTP positions of doc_b (the last reads token t + 1 = 30, after it)
    assert not torch.allclose(unmasked_a[6:14], unmasked_b[3:11], atol=1e-3)  # the mask matters


@pytest.mark.multiprocess
def test_document_masks_on_fsdp2_x_expert_parallel_match_one_process(world, tmp_path, data_dir):
    flags = mixture_flags(world, "--training.max_iters", "4", "--training.gradient_accumulation_steps", "2",
                          "--checkpointer.save_interval", "0", "--sample.max_new_tokens", "0")  # fmt: skip
    run_trainer(tmp_path / "one", data_dir, *flags)
    cmd = [*torchrun_args(2), "-m", "runtime", "train",
           *trainer_args(tmp_path / "two", data_dir, *flags, "--system.distributed.enabled", "true",
                         "--system.distributed.backend", "gloo", "--system.distributed.expert_parallel", "2")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("loss", "main_loss", "val_loss"):
        assert losses(tmp_path / "two", key) == pytest.approx(
            losses(tmp_path / "one", key), rel=1e-4
        )


# ----------------------------------------------------------------------------- what a new user hit


def test_text_dir_refuses_record_files_and_names_what_it_skipped(tmp_path, data_dir):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", CORPUS[:5])
    with pytest.raises(DataError, match=r"a\.jsonl.*read as raw bytes.*data prepare"):
        run_trainer(
            tmp_path / "o", data_dir, "--data.dataset", "text_dir", "--data.path", str(folder)
        )
    (folder / "a.jsonl").unlink()
    (folder / "blob.parquet.bin").write_bytes(b"PAR1\x00\xff")
    with pytest.raises(DataError) as error:
        run_trainer(
            tmp_path / "o", data_dir, "--data.dataset", "text_dir", "--data.path", str(folder)
        )
    message = str(error.value)
    assert (
        "dataset 'text_dir'" in message and "skipped blob.parquet.bin (not UTF-8 text)" in message
    )
    assert "<Dataset" not in message


def test_a_tokenizer_that_does_not_match_init_froms_is_a_config_error(world, tmp_path, data_dir):
    for tokenizer in ("bpe", "bytes"):
        args = trainer_args(tmp_path / "o", data_dir, "--checkpointer.init_from", world["release"],
                            "--data.tokenizer", tokenizer)  # fmt: skip
        resolved = resolve(None, argv=args)  # as the command line: `bytes` set explicitly
        with pytest.raises(
            ConfigError, match=r"data\.tokenizer: .*other token ids than the tokenizer of"
        ):
            Trainer(resolved.config, resolved)
    small = TextCodec.from_path(make_tokenizer(tmp_path / "other", vocab=280))
    big = make_tokenizer(tmp_path / "big", vocab=340)
    (np.arange(4000) % 300).astype(np.uint16).tofile(tmp_path / "t.bin")  # ids that fit either
    bin_corpus = ("--data.dataset", "bin", "--data.path", str(tmp_path / "t.bin"))
    with pytest.raises(DataError, match=r"has 342 ids, more than the model's vocabulary of 320"):
        run_trainer(
            tmp_path / "o2",
            data_dir,
            *bin_corpus,
            "--model.vocab_size",
            VOCAB,
            "--data.tokenizer",
            big,
        )
    assert small.vocab_size == 282


def test_bin_ids_are_checked_once_at_load_and_a_uint32_file_read_as_uint16_is_caught(
    tmp_path, data_dir
):
    ids = (np.arange(5000) % 250).astype(np.uint16)
    ids[3001] = 300
    ids.tofile(tmp_path / "t.bin")
    with pytest.raises(
        DataError, match=r"t\.bin: token 3,001 is id 300, outside the model's vocabulary of 256"
    ):
        run_trainer(
            tmp_path / "o",
            data_dir,
            "--data.dataset",
            "bin",
            "--data.path",
            str(tmp_path / "t.bin"),
        )
    (np.arange(5000) % 250).astype(np.uint32).tofile(tmp_path / "w.bin")
    with pytest.raises(DataError, match="looks like a uint32 file read as uint16"):
        run_trainer(
            tmp_path / "o",
            data_dir,
            "--data.dataset",
            "bin",
            "--data.path",
            str(tmp_path / "w.bin"),
        )


@pytest.mark.slow
def test_mtp_modules_are_the_weights_unless_the_run_says_how_many(world, tmp_path, data_dir):
    # what transformers saves: config.json says one MTP layer, the weights hold none
    folder = tmp_path / "saved"
    export_hf(
        load_source(world["release"]).build_model(),
        str(folder),
        tokenizer=world["codec"],
        mtp=False,
    )
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    common = ("--checkpointer.init_from", str(folder), "--training.max_iters", "1")
    default = run_trainer(tmp_path / "a", data_dir, *common)
    assert default.cfg.model.mtp_depth == 0 and "mtp_loss_1" not in metrics(tmp_path / "a")[0]
    off = run_trainer(tmp_path / "b", data_dir, *common, "--model.mtp_depth", "0")
    assert off.cfg.model.mtp_depth == 0
    # as on the command line, where a value is explicit even when it is the default
    args = trainer_args(tmp_path / "c", data_dir, *common, "--model.mtp_depth", "1")
    resolved = resolve(None, argv=args)
    with pytest.warns(
        UserWarning, match=r"no weights for MTP module\(s\) \['0'\]; they keep their init"
    ):
        fresh = Trainer(resolved.config, resolved)
        assert fresh.run() == 0
    assert fresh.cfg.model.mtp_depth == 1 and "mtp_loss_1" in metrics(tmp_path / "c")[0]
    with pytest.warns(UserWarning, match="config says 1 MTP modules but the weights hold 0"):
        assert (
            load_source(str(folder)).model_config().mtp_depth == 0
        )  # sample and export: the same rule
    log = (tmp_path / "c" / "train.log").read_text()
    assert "(main " in log  # the main loss beside a total that carries the fresh MTP's


@pytest.mark.slow
def test_sample_of_a_run_without_a_text_tokenizer_takes_token_ids(tmp_path, data_dir):
    ids = (np.arange(5000) % 250).astype(np.uint16)
    ids.tofile(tmp_path / "t.bin")
    run_trainer(tmp_path / "o", data_dir, "--data.dataset", "bin", "--data.path", str(tmp_path / "t.bin"),
                "--training.max_iters", "1")  # fmt: skip
    ckpt = str(tmp_path / "o" / "checkpoints" / "ckpt_0000001.pt")
    text = subprocess.run([PYTHON, "-m", "runtime", "sample", ckpt, "--prompt", "def parse(self, "],
                          cwd=REPO, capture_output=True, text=True, env=ENV)  # fmt: skip
    assert text.returncode == 2 and "Traceback" not in text.stderr
    assert "has no text tokenizer" in text.stderr and "token ids separated by spaces" in text.stderr
    good = subprocess.run([PYTHON, "-m", "runtime", "sample", ckpt, "--prompt", "5 6 7", "--max-new-tokens", "3"],
                          cwd=REPO, capture_output=True, text=True, env=ENV)  # fmt: skip
    assert good.returncode == 0 and len(good.stdout.split()) == 3
    assert all(t.isdigit() for t in (tmp_path / "o" / "sample.txt").read_text().split())


@pytest.mark.slow
def test_the_readme_walk_through_runs_as_written(tmp_path):
    # the miniature release and corpus, prepare, then configs/continued_pretraining.yaml as it is
    # (fewer steps), all from a working folder as in README
    def run(*argv):
        proc = subprocess.run([PYTHON, *map(str, argv)], cwd=tmp_path, capture_output=True, text=True,
                              env=ENV, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    run("-m", "bench.tiny_release", "out/release", "--corpus", "out/corpus.jsonl", "--steps", "5")
    prepared = run("-m", "runtime", "data", "prepare", "out/corpus.jsonl", "--tokenizer", "out/release",
                   "--out", "out/corpus_ds")  # fmt: skip
    assert prepared.startswith("wrote out/corpus_ds:")
    run("-m", "runtime", "train", REPO / "configs" / "continued_pretraining.yaml", "--training.max_iters", "4",
        "--evaluator.eval_interval", "4", "--checkpointer.save_interval", "4")  # fmt: skip
    rows = metrics(tmp_path / "out" / "cpt")
    tokens = 4 * 16 * 128  # 4 steps of 16 sequences of 128
    assert rows[0]["iter"] == 4 and rows[0]["data/corpus_ds/tokens"] == tokens
    assert any("val_loss" in r for r in rows)
    run("-m", "runtime", "export", "out/cpt/checkpoints/ckpt_0000004.pt", "out/cpt_hf", "--no-mtp")
    assert TextCodec.from_path(str(tmp_path / "out" / "cpt_hf")).same_ids_as(
        TextCodec.from_path(str(tmp_path / "out" / "release"))
    )
