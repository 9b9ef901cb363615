"""Hugging Face interop: export to and import from a DeepseekV3ForCausalLM folder.

A folder is config.json (model_type deepseek_v3) plus model.safetensors (or sharded safetensors with
model.safetensors.index.json) using the released DeepSeek-V3 key names: per-expert
`mlp.experts.{j}.{gate,up,down}_proj.weight` (transformers fuses them into gate_up_proj/down_proj
on load; fused keys are accepted on import too) and the MTP modules at layer index
`num_hidden_layers + k` (embed_tokens, enorm, hnorm, eh_proj, shared_head.norm, shared_head.head and
the block's usual names). transformers itself is not imported here.

With a tokenizer (every checkpoint of a text corpus has one: bytes or the run's BPE) the folder
also gets tokenizer.json and tokenizer_config.json, so AutoTokenizer.from_pretrained loads it.
transformers' DeepseekV3ForCausalLM has no MTP module: it reports the MTP layer's weights as
UNEXPECTED keys on load and ignores them (harmless; `--no-mtp` writes a folder without them).

`python -m runtime export CHECKPOINT OUT_DIR [--no-mtp]` -> export_main.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings

import torch
from torch import Tensor

from generated.config import ModelConfig, MoETrainingConfig, MTPTrainingConfig
from runtime.model import Transformer

# block-level keys: ours -> HF (relative to layers.{i}. / model.layers.{i}.)
BLOCK_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
BLOCK_KEYS_INV = {v: k for k, v in BLOCK_KEYS.items()}
TOP_KEYS = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
TOP_KEYS_INV = {v: k for k, v in TOP_KEYS.items()}
MTP_KEYS = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}
MTP_KEYS_INV = {v: k for k, v in MTP_KEYS.items()}

# spec field -> HF config.json key, for the fields that map one to one
FIELD_TO_HF = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "first_k_dense": "first_k_dense_replace",
    "n_heads": "num_attention_heads",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "top_k": "num_experts_per_tok",
    "n_group": "n_group",
    "topk_group": "topk_group",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "norm_topk_prob": "norm_topk_prob",
    "mtp_depth": "num_nextn_predict_layers",
}


# ----------------------------------------------------------------------------- config


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers' DeepseekV3ForCausalLM."""
    if cfg.score_func != "sigmoid":
        raise ValueError(
            f"cannot export score_func={cfg.score_func!r}: Hugging Face DeepseekV3 implements only "
            "sigmoid router scoring, so the exported model would compute something else"
        )
    if cfg.norm_eps != 1e-6:
        warnings.warn(
            f"norm_eps={cfg.norm_eps}: transformers' DeepseekV3 uses eps 1e-6 in the q/kv latent norms, "
            "so its outputs will differ slightly from this model's"
        )
    out = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **{hf: getattr(cfg, f) for f, hf in FIELD_TO_HF.items()},
        "q_lora_rank": cfg.q_lora_rank or None,
        "num_key_value_heads": cfg.n_heads,
        "hidden_act": "silu",
        "topk_method": "noaux_tc",
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": None,  # byte-level vocab: no special tokens (HF's defaults 0/1 would stop generation)
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    return out


def model_fields_from_hf_config(config_json: dict) -> dict[str, object]:
    """Spec `model` field name -> value, from an HF DeepseekV3 config.json dict.

    Keys missing from config_json are left out (the spec defaults then apply). Raises ValueError
    for settings this model does not implement.
    """
    c = config_json
    if c.get("model_type", "deepseek_v3") != "deepseek_v3":
        raise ValueError(f"expected model_type deepseek_v3, got {c.get('model_type')!r}")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(
            f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported"
        )
    for key, ok in [
        ("attention_bias", lambda v: not v),
        ("tie_word_embeddings", lambda v: not v),
        ("hidden_act", lambda v: v == "silu"),
        ("rope_interleave", lambda v: v),
        ("num_key_value_heads", lambda v: v is None or v == c.get("num_attention_heads")),
    ]:
        if key in c and not ok(c[key]):
            raise ValueError(f"unsupported Hugging Face setting {key}={c[key]!r}")
    fields = {f: c[hf] for f, hf in FIELD_TO_HF.items() if hf in c}
    if "num_nextn_predict_layers" not in c and "num_mtp_layers" in c:
        fields["mtp_depth"] = c["num_mtp_layers"]
    if "q_lora_rank" in c:
        fields["q_lora_rank"] = c["q_lora_rank"] or 0
    theta = rope.get("rope_theta", c.get("rope_theta"))
    if theta is not None:
        fields["rope_theta"] = float(theta)
    return fields


# ----------------------------------------------------------------------------- weights


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our state dict under HF names, experts split per expert, MTP at layer n_layers + k."""
    n = model.config.n_layers
    out: dict[str, Tensor] = {}

    def put_block(prefix: str, key: str, t: Tensor) -> None:
        if key == "ffn.experts.w13":  # (E, 2I, C): gate rows then up rows
            gate, up = t.chunk(2, dim=1)
            for j in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{j}.gate_proj.weight"] = gate[j]
                out[f"{prefix}mlp.experts.{j}.up_proj.weight"] = up[j]
        elif key == "ffn.experts.w2":  # (E, C, I)
            for j in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{j}.down_proj.weight"] = t[j]
        else:
            out[prefix + BLOCK_KEYS[key]] = t

    for name, t in model.state_dict().items():
        if name in TOP_KEYS:
            out[TOP_KEYS[name]] = t
        elif m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
            put_block(f"model.layers.{m[1]}.", m[2], t)
        elif m := re.fullmatch(r"mtp\.(\d+)\.block\.(.+)", name):
            put_block(f"model.layers.{n + int(m[1])}.", m[2], t)
        elif m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
            out[f"model.layers.{n + int(m[1])}.{MTP_KEYS[m[2]]}"] = t
        else:
            raise KeyError(f"no Hugging Face name for {name}")
    for k in range(model.config.mtp_depth):  # the released weights carry their own copies
        out[f"model.layers.{n + k}.embed_tokens.weight"] = model.embed.weight
        out[f"model.layers.{n + k}.shared_head.head.weight"] = model.head.weight
    # safetensors wants contiguous tensors that share no storage
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """Inverse of to_hf_state_dict; also takes the fused gate_up_proj/down_proj expert layout."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}  # (our prefix, proj) -> expert -> weight
    for name, t in hf.items():
        if name in TOP_KEYS_INV:
            out[TOP_KEYS_INV[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            raise KeyError(f"unexpected Hugging Face key {name}")
        i, key = int(m[1]), m[2]
        if i >= n_layers:
            prefix = f"mtp.{i - n_layers}."
            if key in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # copies of the shared embedding / head
            if key in MTP_KEYS_INV:
                out[prefix + MTP_KEYS_INV[key]] = t
                continue
            prefix += "block."
        else:
            prefix = f"layers.{i}."
        if e := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", key):
            experts.setdefault((prefix, e[2]), {})[int(e[1])] = t
        elif key == "mlp.experts.gate_up_proj":
            out[prefix + "ffn.experts.w13"] = t
        elif key == "mlp.experts.down_proj":
            out[prefix + "ffn.experts.w2"] = t
        elif key in BLOCK_KEYS_INV:
            out[prefix + BLOCK_KEYS_INV[key]] = t
        else:
            raise KeyError(f"unexpected Hugging Face key {name}")

    def stack(prefix: str, proj: str) -> Tensor:
        d = experts[(prefix, proj)]
        return torch.stack([d[j] for j in range(len(d))])

    for prefix in sorted({p for p, _ in experts}):
        out[prefix + "ffn.experts.w13"] = torch.cat(
            [stack(prefix, "gate_proj"), stack(prefix, "up_proj")], dim=1
        )
        out[prefix + "ffn.experts.w2"] = stack(prefix, "down_proj")
    return out


def _read_safetensors(folder: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    out: dict[str, Tensor] = {}
    for shard in shards:
        out.update(load_file(os.path.join(folder, shard)))
    return out


def export_hf(model: Transformer, out_dir: str, tokenizer=None, mtp: bool = True) -> None:
    """Write config.json and model.safetensors (fp32) to out_dir, and the tokenizer's files when
    given (a runtime.tokenizer.TextCodec). `mtp=False` leaves the MTP modules out (and says
    num_nextn_predict_layers 0), so transformers loads the folder without UNEXPECTED keys."""
    from safetensors.torch import save_file

    model_cfg = model.config if mtp else dataclasses.replace(model.config, mtp_depth=0)
    config = hf_config(model_cfg)  # refuses softmax scoring before writing anything
    weights = to_hf_state_dict(model)
    if not mtp:
        n = model.config.n_layers
        weights = {k: v for k, v in weights.items() if not _is_mtp_key(k, n)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_hf(out_dir, model_max_length=model.config.max_seq_len)


def _is_mtp_key(name: str, n_layers: int) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m[1]) >= n_layers


def load_hf_folder(path: str) -> tuple[dict[str, object], dict[str, Tensor]]:
    """(spec model fields, our state dict) from an HF DeepseekV3 folder."""
    with open(os.path.join(path, "config.json")) as f:
        fields = model_fields_from_hf_config(json.load(f))
    n_layers = fields.get("n_layers", ModelConfig().n_layers)
    sd = from_hf_state_dict(_read_safetensors(path), n_layers)
    # transformers' save_pretrained drops the MTP layers (it has no module for them)
    present = {int(k.split(".")[1]) for k in sd if k.startswith("mtp.")}
    depth = fields.get("mtp_depth", ModelConfig().mtp_depth)
    if depth > len(present):
        warnings.warn(
            f"{path}: config says {depth} MTP modules but the weights hold {len(present)}; using {len(present)}"
        )
        fields["mtp_depth"] = depth = len(present)
    sd = {
        k: v for k, v in sd.items() if not (k.startswith("mtp.") and int(k.split(".")[1]) >= depth)
    }
    return fields, sd


def load_hf_weights(model: Transformer, folder: str) -> None:
    """Load an HF folder's weights into an already built model of the same architecture."""
    sd = from_hf_state_dict(_read_safetensors(folder), model.config.n_layers)
    missing = set(model.state_dict()) - set(sd)
    absent = {k.split(".")[1] for k in missing if k.startswith("mtp.")}
    if absent and not any(k.startswith(f"mtp.{m}.") for m in absent for k in sd):
        # a folder written by transformers' save_pretrained has no MTP weights: keep the fresh ones
        warnings.warn(
            f"{folder} has no weights for MTP module(s) {sorted(absent)}; they keep their init"
        )
        missing = {k for k in missing if not k.startswith("mtp.")}
    if missing:
        raise KeyError(f"{folder} lacks weights for {sorted(missing)[:5]} ...")
    result = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"{folder} has weights this model lacks: {result.unexpected_keys[:5]} ...")


# ----------------------------------------------------------------------------- sources


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    # torch.compile and DDP wrappers prefix the names
    out = {}
    for k, v in sd.items():
        for p in ("_orig_mod.", "module."):
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def load_model_source(source: str, device: str | torch.device = "cpu") -> Transformer:
    """A Transformer (eval mode) from a trainer checkpoint file or a Hugging Face folder.

    Checkpoint file: one written by the trainer (checksum verified, weights_only unpickling); its
    saved config gives the model, moe and mtp sections.
    """
    return load_model_and_tokenizer(source, device)[0]


def load_model_and_tokenizer(source: str, device: str | torch.device = "cpu"):
    """(Transformer in eval mode, TextCodec or None) from a checkpoint file or a Hugging Face folder.

    The tokenizer: a folder's tokenizer.json (bytes without one), a checkpoint's stored tokenizer,
    or bytes for an older checkpoint of a text corpus; None for a pre-tokenized `bin` corpus."""
    from runtime.tokenizer import TextCodec

    if os.path.isdir(source):
        fields, sd = load_hf_folder(source)
        model = Transformer(ModelConfig(**fields), MoETrainingConfig(), MTPTrainingConfig())
        codec = TextCodec.from_folder(source)
    else:
        from generated.parser import config_from_dict
        from runtime.checkpoint import load_checkpoint  # verifies the checksum first

        ckpt = load_checkpoint(source)
        config = config_from_dict(ckpt["config"])
        model = Transformer(config.model, config.moe, config.mtp)
        sd = _strip_prefixes(ckpt["model"])
        if ckpt.get("tokenizer"):
            codec = TextCodec.from_state(ckpt["tokenizer"])
        else:
            codec = TextCodec.bytes() if config.data.dataset != "bin" else None
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.to(device).eval(), codec


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime export",
        description="Write a checkpoint as a Hugging Face DeepseekV3 folder.",
    )
    parser.add_argument("checkpoint", help="trainer checkpoint file (or a Hugging Face folder)")
    parser.add_argument("out_dir", help="folder to write config.json, model.safetensors and the tokenizer to")
    parser.add_argument(
        "--no-mtp", action="store_true",
        help="leave out the MTP modules (transformers has none and reports their weights as UNEXPECTED keys)",
    )
    args = parser.parse_args(argv)
    try:
        model, codec = load_model_and_tokenizer(args.checkpoint)
        export_hf(model, args.out_dir, tokenizer=codec, mtp=not args.no_mtp)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_dir} ({model.num_params():,} parameters)")
    return 0
