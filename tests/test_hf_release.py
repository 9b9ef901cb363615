"""DeepSeek-V3's released format: its config.json unchanged, YaRN parity with transformers, block
FP8 weights in sharded safetensors with the MTP layer, and sharded / bf16 export."""

import json
import os
import shutil
import warnings

import pytest
import torch

from generated.config import ModelConfig
from generated.parser import ConfigError, load_config, resolved_from_config
from helpers import (
    RELEASED,
    REPO,
    dequantize_loop,
    load_hf,
    make_model,
    quantize_fp8,
    released,
    write_release_folder,
)
from runtime.cli import export as export_cli
from runtime.interop.hf_folder import export_hf
from runtime.interop.safetensors import dequantize_fp8, read_safetensors
from runtime.interop.sources import load_source
from runtime.models.deepseek_v3 import state_dict_adapter as hf_mod
from runtime.models.deepseek_v3.generation import generate
from runtime.models.deepseek_v3.model import Transformer
from runtime.trainer.prepare import init_from

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- config.json


def test_released_config_loads_unchanged(tmp_path, monkeypatch):
    c = released()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no key is unknown
        fields = hf_mod.model_fields_from_hf_config(c)
    cfg = ModelConfig(**fields)
    assert (cfg.dim, cfg.n_layers, cfg.first_k_dense, cfg.n_heads, cfg.q_lora_rank) == (
        7168,
        61,
        3,
        128,
        1536,
    )
    assert (cfg.n_routed_experts, cfg.top_k, cfg.n_group, cfg.topk_group, cfg.route_scale) == (
        256,
        8,
        8,
        4,
        2.5,
    )
    assert (cfg.max_seq_len, cfg.mtp_depth, cfg.vocab_size, cfg.moe_inter_dim) == (
        163840,
        1,
        129280,
        2048,
    )
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.original_seq_len) == ("yarn", 40.0, 4096)
    assert (cfg.beta_fast, cfg.beta_slow, cfg.mscale, cfg.mscale_all_dim) == (32.0, 1.0, 1.0, 1.0)
    # every key is used, checked or ignored
    known = hf_mod.HF_USED | set(hf_mod.HF_CHECKED) | set(hf_mod.HF_IGNORED)
    assert set(c) <= known
    # the trainer's init_from takes the folder (the architecture fills the model section); the
    # 700 GB of weights are not here, so load_source skips checking that they fit
    from runtime.interop.sources import Source

    monkeypatch.setattr(Source, "check_fits", lambda self: None)
    monkeypatch.setattr(Source, "mtp_modules_with_weights", lambda self: {0})  # as released
    (tmp_path / "r1").mkdir()
    shutil.copy(RELEASED, tmp_path / "r1" / "config.json")
    config = load_config(
        argv=["--checkpointer.init_from", str(tmp_path / "r1"), "--training.seq_len", "128"]
    )
    resolved, _ = init_from(resolved_from_config(config))
    assert resolved.config.model == cfg


@pytest.mark.parametrize(
    "key,value",
    [
        ("topk_method", "greedy"),
        ("moe_layer_freq", 2),
        ("seq_aux", False),
        ("attention_bias", True),
        ("hidden_act", "gelu"),
        ("num_key_value_heads", 8),
        (
            "quantization_config",
            {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]},
        ),
        ("rope_scaling", {"type": "longrope", "factor": 4}),
        ("rope_scaling", {**released()["rope_scaling"], "truncate": False}),
    ],
)
def test_unsupported_values_are_config_errors_naming_the_key(tmp_path, key, value):
    c = released()
    c[key] = value
    name = key.split("_config")[0]
    with pytest.raises(ValueError, match=name):
        hf_mod.model_fields_from_hf_config(c)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(c))
    config = load_config(argv=["--checkpointer.init_from", str(folder)])
    with pytest.raises(ConfigError, match=f"checkpointer.init_from: .*{name}"):
        init_from(resolved_from_config(config))


def test_unknown_keys_warn_and_config_md_lists_the_ignored_and_checked_keys():
    with pytest.warns(UserWarning, match="frobnicate"):
        hf_mod.model_fields_from_hf_config({**released(), "frobnicate": 1})
    with open(os.path.join(REPO, "generated", "CONFIG.md")) as f:
        doc = f.read()
    model_doc = doc[doc.index("## model") : doc.index("## moe")]
    for key in [*hf_mod.HF_IGNORED, *hf_mod.HF_CHECKED, "quantization_config", "rope_scaling"]:
        assert f"`{key}`" in model_doc, key


# ----------------------------------------------------------------------------- YaRN


YARN = {
    "released": dict(rope_scaling="yarn", rope_factor=40.0, original_seq_len=16),
    "mscales": dict(
        rope_scaling="yarn",
        rope_factor=4.0,
        original_seq_len=8,
        beta_fast=8.0,
        beta_slow=0.5,
        mscale=0.707,
        mscale_all_dim=1.0,
        q_lora_rank=24,
    ),
}


@pytest.mark.parametrize("variant", sorted(YARN))
def test_yarn_logits_match_transformers(variant, tmp_path):
    model = make_model(**YARN[variant])
    export_hf(model, str(tmp_path))
    ref = load_hf(str(tmp_path))
    assert ref.config.rope_parameters["rope_type"] == "yarn"
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = ref(tokens).logits
        assert (model(tokens).logits - theirs).abs().max().item() < 1e-4
        # sensitive to each part: plain rope, or yarn without the softmax mscale, is far off
        plain = make_model(**{k: v for k, v in YARN[variant].items() if k != "rope_scaling"})
        assert (plain(tokens).logits - theirs).abs().max().item() > 1e-3
        for layer in model.layers:
            layer.attn.softmax_scale = (16 + 8) ** -0.5
        assert (model(tokens).logits - theirs).abs().max().item() > 1e-3
    # and the exported config.json imports back to the same model section
    assert ModelConfig(**load_source(str(tmp_path)).model_fields) == model.config


# ----------------------------------------------------------------------------- FP8 / shards / MTP


def test_dequantize_partial_edge_blocks():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, s = quantize_fp8(w)
    assert s.shape == (3, 2)  # 128 + 128 + 44 rows, 128 + 72 columns
    got = dequantize_fp8(q, s, (128, 128))
    torch.testing.assert_close(got, dequantize_loop(q, s), rtol=0, atol=0)
    assert (got - w).abs().max() < 0.07 * w.abs().max()  # e4m3 precision
    with pytest.raises(ValueError, match="blocks needs"):
        dequantize_fp8(q, s[:2], (128, 128), "x.weight")


def test_release_format_fp8_sharded_with_mtp_samples_like_transformers(tmp_path):
    fp8, ref_dir, dequant = write_release_folder(tmp_path)
    from safetensors.torch import load_file

    stored = {}
    for shard in sorted(p.name for p in fp8.glob("*.safetensors")):
        stored.update(load_file(str(fp8 / shard)))
    kv_a = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert stored[kv_a].dtype == torch.float8_e4m3fn and stored[kv_a].shape == (24, 144)
    assert stored[kv_a + "_scale_inv"].shape == (1, 2)  # partial edge blocks both ways
    assert stored["model.layers.2.enorm.weight"].dtype == torch.bfloat16
    assert (
        "model.layers.2.shared_head.head.weight" in stored
        and "model.layers.2.embed_tokens.weight" in stored
    )
    ours = load_source(str(fp8)).build_model()
    assert ours.config.mtp_depth == 1 and ours.config.rope_scaling == "yarn"
    # the MTP layer (index 2) loads into our MTP module exactly
    L = 2
    mtp = ours.mtp[0]
    pairs = {
        "enorm.weight": mtp.enorm.weight,
        "hnorm.weight": mtp.hnorm.weight,
        "eh_proj.weight": mtp.eh_proj.weight,
        "shared_head.norm.weight": mtp.norm.weight,
        "self_attn.kv_a_proj_with_mqa.weight": mtp.block.attn.wkv_a.weight,
        "self_attn.q_b_proj.weight": mtp.block.attn.wq_b.weight,
        "mlp.gate.weight": mtp.block.ffn.gate.weight,
        "mlp.shared_experts.down_proj.weight": mtp.block.ffn.shared_experts.w2.weight,
        "mlp.gate.e_score_correction_bias": mtp.block.ffn.gate.e_score_correction_bias,
    }
    for key, param in pairs.items():
        assert torch.equal(param, dequant[f"model.layers.{L}.{key}"]), key
    for j in range(8):
        gate, up = mtp.block.ffn.experts.w13[j].chunk(2)
        assert torch.equal(gate, dequant[f"model.layers.{L}.mlp.experts.{j}.gate_proj.weight"])
        assert torch.equal(up, dequant[f"model.layers.{L}.mlp.experts.{j}.up_proj.weight"])
    # the main model samples greedily token for token like transformers on the dequantized weights
    ref = load_hf(str(ref_dir))
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(tokens).logits - ref(tokens).logits).abs().max().item() < 1e-4
    prompt = tokens[:, :5]
    got = generate(ours, prompt, 12, temperature=0.0)
    want = ref.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert got.tolist() == want.tolist()
    assert len(set(got[0, 5:].tolist())) > 1
    # the trainer's init_from path (load_weights into a built model) takes the same folder
    fresh = Transformer(ours.config)
    load_source(str(fp8)).load_weights(fresh)
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_export_sharded_bf16(tmp_path):
    model = make_model(q_lora_rank=24, mtp_depth=1)
    export_hf(model, str(tmp_path / "fp32"))
    out = tmp_path / "out"
    args = [str(tmp_path / "fp32"), str(out), "--dtype", "bfloat16", "--max-shard-size", "40KB"]
    assert export_cli.main(args) == 0
    with open(out / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    from safetensors.torch import load_file

    for shard in shards:
        for k, t in load_file(str(out / shard)).items():
            assert t.dtype == (
                torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
            ), k
            assert t.numel() * t.element_size() <= 40_000 or len(load_file(str(out / shard))) == 1
    back = load_source(str(out)).build_model()
    for k, v in model.state_dict().items():
        want = v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16).float()
        assert torch.equal(back.state_dict()[k], want), k
    ref = load_hf(str(out))  # transformers reads the sharded folder
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert (back(tokens).logits - ref(tokens).logits).abs().max().item() < 1e-4
    # fp32 under the limit: one file, and the old shards are gone
    export_hf(model, str(out))
    assert sorted(n for n in os.listdir(out) if n.startswith("model")) == ["model.safetensors"]
    assert (out / "config.json").exists()


def test_blocks_of_a_release_folder_equal_the_whole_weights_blocks(tmp_path):
    # what init_from into a sharded model reads: any block, FP8 ones dequantized with only their
    # own scales (offsets inside 128x128 scale blocks), experts stacked across the gate/up seam
    from runtime.interop.weight_blocks import hf_blocks

    fp8, _, _ = write_release_folder(tmp_path)
    whole = hf_mod.from_hf_state_dict(read_safetensors(str(fp8), lambda: (128, 128)), 2)
    blocks = hf_blocks(str(fp8), 2, hf_mod, lambda: (128, 128))
    assert sorted(blocks) == sorted(whole)
    g = torch.Generator().manual_seed(0)
    for name, full in whole.items():
        assert tuple(blocks[name].shape) == tuple(full.shape), name
        for _ in range(4):
            index = []
            for n in full.shape:
                a = int(torch.randint(0, n, (), generator=g))
                index.append(slice(a, int(torch.randint(a + 1, n + 1, (), generator=g))))
            assert torch.equal(blocks[name][tuple(index)], full[tuple(index)]), (name, index)
    dense_gate = "layers.0.ffn.w1.weight"  # FP8 (160, 144): crosses a scale block both ways
    index = (slice(100, 150), slice(120, 140))
    assert whole[dense_gate].shape == (160, 144)
    assert torch.equal(blocks[dense_gate][index], whole[dense_gate][index])
    w13 = "layers.1.ffn.experts.w13"  # (8, 2 x 32, 144): rows 20-40 are gate 20-32 and up 0-8
    index = (slice(3, 5), slice(20, 40), slice(0, 144))
    assert torch.equal(blocks[w13][index], whole[w13][index])


def test_damaged_safetensors_are_one_clear_error_without_reading_them(tmp_path):
    # init_from reads a folder by blocks: a truncated shard, a header claiming more bytes than the
    # file (checked before any allocation) or offsets outside it are a CheckpointError naming the file
    from runtime.checkpoint.format import CheckpointError

    fp8, _, _ = write_release_folder(tmp_path)
    model = load_source(str(fp8)).build_model()
    shard = fp8 / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    cases = {
        "truncated": data[: len(data) - 1000],
        "header bomb": (2**62).to_bytes(8, "little") + data[8:],
        "offsets outside": data.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1),
    }
    for name, damaged in cases.items():
        shard.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors") as info:
            load_source(str(fp8)).load_weights(Transformer(model.config))
        assert "Traceback" not in str(info.value), name
    shard.write_bytes(data)
    load_source(str(fp8)).load_weights(Transformer(model.config))  # intact again: loads


def test_a_config_that_does_not_fit_its_weights_is_refused_before_any_model_is_built(tmp_path):
    # load_source checks the weights' names and shapes against the architecture on the meta
    # device: a config.json claiming a 3e8-token vocabulary (a 77 GB embedding) or far more layers
    # than the weights hold is one CheckpointError, never an allocation of the model it describes
    from runtime.checkpoint.format import CheckpointError

    folder = tmp_path / "hf"
    export_hf(make_model(), str(folder), mtp=False)
    config = json.loads((folder / "config.json").read_text())
    cases = {
        "vocab_size": (300_000_000, r"embed.weight is \[256, 64\] in the checkpoint but \[3000"),
        "num_hidden_layers": (1000, r"has 1000 layers \(n_layers\) but the weights .* hold 3"),
    }
    for key, (value, message) in cases.items():
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=message):
            load_source(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    assert load_source(str(folder)).model_config().n_layers == 3
