"""Tokenizers (bytes and a trained byte-level BPE, through training, checkpoints, export and
AutoTokenizer), bits per byte, and sampling: top-k / top-p and the MLA KV cache."""

import json
import math
import os
import shutil
import sysconfig

import pytest
import torch

from generated.parser import ConfigError, load_config
from helpers import TINY_RUN_FLAGS, debug_model, trainer_args
from runtime.cli import export as export_cli
from runtime.cli import sample as sample_cli
from runtime.components.data.corpus import load_corpus
from runtime.components.tokenizer import TextCodec
from runtime.interop.hf_folder import export_hf
from runtime.models.deepseek_v3.generation import filter_logits, generate
from runtime.trainer.trainer import Trainer, complete

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "héllo wörld\n  def f(x):\n\treturn x * 2  # 🙂\n"


# --- KV cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize("q_lora_rank", [0, 8])
def test_cached_generation_matches_uncached(q_lora_rank):
    model = debug_model(q_lora_rank=q_lora_rank, mtp_depth=1)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    slow, slow_logits = generate(model, prompt, 20, 0.0, use_cache=False, return_logits=True)
    fast, fast_logits = generate(model, prompt, 20, 0.0, use_cache=True, return_logits=True)
    assert torch.equal(fast, slow)
    torch.testing.assert_close(fast_logits, slow_logits, atol=1e-4, rtol=1e-4)
    # past max_seq_len (64) the window slides; both paths see the same last 64 tokens
    long_prompt = torch.randint(0, 64, (1, 60), generator=torch.Generator().manual_seed(1))
    slow, slow_logits = generate(model, long_prompt, 10, 0.0, use_cache=False, return_logits=True)
    fast, fast_logits = generate(model, long_prompt, 10, 0.0, use_cache=True, return_logits=True)
    assert torch.equal(fast, slow)
    torch.testing.assert_close(fast_logits, slow_logits, atol=1e-4, rtol=1e-4)


def test_cache_keeps_the_latent_and_feeds_one_token_per_step():
    model = debug_model()
    cache = model.new_cache()
    logits = model(torch.tensor([[1, 2, 3]]), cache=cache)
    logits = model(torch.tensor([[4]]), cache=cache).logits
    assert cache.pos == 4
    for (
        c_kv,
        k_pe,
    ) in cache.layers:  # the compressed latent and the shared rope key, not per-head K/V
        assert c_kv.shape == (1, 4, model.config.kv_lora_rank) and k_pe.shape == (
            1,
            4,
            model.config.qk_rope_head_dim,
        )
    full = model(torch.tensor([[1, 2, 3, 4]])).logits
    torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    seen = []
    model.embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    generate(model, [1, 2, 3, 4, 5], 6, 0.0)
    assert seen == [5, 1, 1, 1, 1, 1]  # one prefill, then one token per step: linear in length
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 61, dtype=torch.long), cache=cache)


# --- top-k / top-p ----------------------------------------------------------------------------------


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.8)) == [
        True,
        True,
        False,
        False,
    ]  # 0.5 + 0.3 reaches 0.8
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_p=0.1)) == [
        True,
        False,
        False,
        False,
    ]  # the best always stays
    assert kept(filter_logits(logits[:, [3, 1, 0, 2]], top_k=1)) == [False, False, True, False]
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    model = debug_model()
    greedy = generate(model, [1, 2], 8, 0.0)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(generate(model, [1, 2], 8, 1.5, g, top_k=1), greedy)
    assert torch.equal(
        generate(model, [1, 2], 8, 1.5, torch.Generator().manual_seed(3), top_p=1e-6), greedy
    )


# --- tokenizers ----------------------------------------------------------------------------------


def test_byte_tokenizer_is_the_bytes():
    codec = TextCodec.bytes()
    assert codec.encode(TEXT) == list(TEXT.encode()) and codec.decode(codec.encode(TEXT)) == TEXT
    assert codec.vocab_size == 256 and set(codec.token_bytes().tolist()) == {1}


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py"):
        shutil.copy(os.path.join(stdlib, name), folder / name)
    return str(folder)


def bpe_args(out, text_corpus, data_dir, *extra):
    return trainer_args(
        out, data_dir, "--data.dataset", "text_dir", "--data.path", text_corpus,
        "--data.tokenizer", "bpe", "--model.vocab_size", "320", "--training.max_iters", "2",
        "--schedule.warmup_iters", "1", "--evaluator.eval_iters", "1", "--model.mtp_depth", "1",
        "--sample.max_new_tokens", "6", *extra, flags=TINY_RUN_FLAGS,
    )  # fmt: skip


def test_bpe_trains_caches_and_goes_through_training_and_export(
    tmp_path, text_corpus, data_dir, monkeypatch, capsys
):
    trainer = Trainer(load_config(argv=bpe_args(tmp_path / "o", text_corpus, data_dir)))
    corpus = trainer.data.corpus
    assert corpus.dtype == "uint16" and not corpus.is_bytes and trainer.codec.kind == "bpe"
    assert 256 < trainer.codec.vocab_size <= 320
    assert corpus.length < 0.8 * os.path.getsize(
        os.path.join(data_dir, "text_dir.bin")
    )  # 64 merges compress
    assert 1.2 < corpus.bytes_per_token < 6
    assert trainer.codec.decode(trainer.codec.encode(TEXT)) == TEXT
    # cached: a second load reuses tokenizer and tokens
    mtime = os.path.getmtime(corpus.path)
    again = load_corpus(trainer.cfg.data, 320)
    assert (
        os.path.getmtime(again.path) == mtime and again.codec.to_json() == trainer.codec.to_json()
    )
    assert trainer.run() == 0
    saved = TextCodec.from_json("bpe", (tmp_path / "o" / "tokenizer.json").read_text())
    assert saved.encode(TEXT) == trainer.codec.encode(TEXT)
    # bits per byte next to val loss
    val = [
        json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl") if "val_loss" in line
    ][-1]
    assert val["val_bpb"] == pytest.approx(val["val_loss"] / math.log(2) / corpus.bytes_per_token)
    assert "bits/byte" in (tmp_path / "o" / "train.log").read_text()
    # export writes the tokenizer: AutoTokenizer round-trips text with our ids
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    ckpt = str(tmp_path / "o" / "checkpoints" / "ckpt_0000002.pt")
    assert export_cli.main([ckpt, str(tmp_path / "hf")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (
        hf_tok.encode(TEXT) == trainer.codec.encode(TEXT)
        and hf_tok.decode(hf_tok.encode(TEXT)) == TEXT
    )
    # the MTP layer is what transformers calls UNEXPECTED; --no-mtp leaves it out
    _, info = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert info["unexpected_keys"] and all(".layers.2." in k for k in info["unexpected_keys"])
    assert export_cli.main([ckpt, str(tmp_path / "hf_nomtp"), "--no-mtp"]) == 0
    _, info = DeepseekV3ForCausalLM.from_pretrained(
        str(tmp_path / "hf_nomtp"), output_loading_info=True
    )
    assert not info["unexpected_keys"] and not info["missing_keys"]
    # sample decodes with the tokenizer, from the checkpoint and from the folder alike
    capsys.readouterr()
    outs = []
    for source in (ckpt, str(tmp_path / "hf_nomtp")):
        assert (
            sample_cli.main(
                [
                    source,
                    "--prompt",
                    "def ",
                    "--max-new-tokens",
                    "5",
                    "--temperature",
                    "0",
                    "--json",
                ]
            )
            == 0
        )
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["token_ids"] == outs[1]["token_ids"]
    assert set(outs[0]) == {"prompt", "prompt_ids", "token_ids", "text", "tokenizer", "settings"}
    assert outs[0]["prompt_ids"] == trainer.codec.encode("def ") and outs[0]["tokenizer"] == "bpe"
    assert outs[0]["text"] == trainer.codec.decode(outs[0]["token_ids"])
    assert outs[0]["settings"]["kv_cache"] is True


def test_byte_runs_export_a_byte_tokenizer(tmp_path, data_dir):
    args = trainer_args(
        tmp_path / "o",
        data_dir,
        "--training.max_iters",
        "1",
        "--evaluator.eval_iters",
        "1",
        "--schedule.warmup_iters",
        "0",
        flags=TINY_RUN_FLAGS,
    )
    trainer = Trainer(load_config(argv=args))
    assert trainer.codec.kind == "bytes"
    export_hf(trainer.model, str(tmp_path / "hf"), tokenizer=trainer.codec)
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok.encode(TEXT) == list(TEXT.encode()) and hf_tok.decode(list(TEXT.encode())) == TEXT


def test_bpe_errors(tmp_path, data_dir, text_corpus):
    # both are spec rules: the config is refused before anything is built
    with pytest.raises(ConfigError, match="need a vocabulary of at least 256"):
        load_config(argv=bpe_args(tmp_path, text_corpus, data_dir, "--model.vocab_size", "100"))
    with pytest.raises(ConfigError, match="uint16"):
        load_config(argv=bpe_args(tmp_path, text_corpus, data_dir, "--model.vocab_size", "70000"))
    with pytest.raises(ConfigError, match="a bin corpus is tokens already"):
        load_config(
            argv=["--data.dataset", "bin", "--data.path", "t.bin", "--data.tokenizer", "bpe"]
        )


def test_cache_grows_past_its_first_buffer():
    model = debug_model(max_seq_len=160)
    prompt = torch.randint(
        0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3)
    )
    slow, slow_logits = generate(model, prompt, 140, 0.0, use_cache=False, return_logits=True)
    fast, fast_logits = generate(model, prompt, 140, 0.0, use_cache=True, return_logits=True)
    assert torch.equal(fast, slow)
    torch.testing.assert_close(fast_logits, slow_logits, atol=1e-4, rtol=1e-4)


def test_end_of_run_sample_follows_every_sample_field():
    # runtime.models.deepseek_v3.generation.complete is what the trainer's end-of-run sample runs with the `sample` section
    from generated.config import SampleConfig

    model = debug_model(max_seq_len=64).eval()
    prompt = [5, 6, 7]

    def run(seed=0, **fields):
        settings = SampleConfig(**{"max_new_tokens": 12, **fields})
        return complete(generate, model, prompt, settings, torch.Generator().manual_seed(seed))

    greedy = run(temperature=0.0)
    assert greedy[:3] == prompt and len(greedy) == 3 + 12  # prompt kept, max_new_tokens added
    assert len(run(temperature=0.0, max_new_tokens=4)) == 3 + 4
    # a fresh model's logits are nearly flat: sampling at temperature 1 leaves the argmax path
    sampled = [run(seed, temperature=1.0) for seed in range(3)]
    assert any(s != greedy for s in sampled)
    assert run(temperature=1.0, top_k=1) == greedy  # top-k 1 keeps only the argmax
    assert run(temperature=1.0, top_p=1e-6) == greedy  # so does a vanishing nucleus
