"""Hugging Face interop: export to and import from a DeepseekV3ForCausalLM folder.

A folder is config.json (model_type deepseek_v3) plus model.safetensors (or sharded safetensors with
model.safetensors.index.json) using the released DeepSeek-V3 key names: per-expert
`mlp.experts.{j}.{gate,up,down}_proj.weight` (transformers fuses them into gate_up_proj/down_proj
on load; fused keys are accepted on import too) and the MTP modules at layer index
`num_hidden_layers + k` (embed_tokens, enorm, hnorm, eh_proj, shared_head.norm, shared_head.head and
the block's usual names). DeepSeek's released block-FP8 weights (float8_e4m3fn with a
`weight_scale_inv` per 128x128 block) are dequantized to float32 on load. Every config.json key
is used, checked against the one value this model implements (ValueError naming it) or ignored
(HF_IGNORED, also listed in the spec's model section doc). transformers itself is not imported.

With a tokenizer (every checkpoint of a text corpus has one: bytes or the run's BPE) the folder
also gets tokenizer.json and tokenizer_config.json, so AutoTokenizer.from_pretrained loads it.
transformers' DeepseekV3ForCausalLM has no MTP module: it reports the MTP layer's weights as
UNEXPECTED keys on load and ignores them (harmless; `--no-mtp` writes a folder without them).

`python -m runtime export CHECKPOINT OUT_DIR [--dtype bfloat16] [--max-shard-size 5GB] [--no-mtp]`
-> export_main.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from generated import HF_NAMES, PATH
from generated.config import ModelConfig
from generated.names import RopeScaling, ScoreFunc
from runtime.components.tokenizer import TextCodec
from runtime.models.deepseek_v3.model import Transformer

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


def _name(path: str) -> str:
    """The field name of a dotted path: model.q_lora_rank -> q_lora_rank."""
    return path.rsplit(".", 1)[-1]


# The spec's Hugging Face names (generated.HF_NAMES). The yarn fields live inside the HF
# rope_scaling / rope_parameters dict; q_lora_rank (0 <-> null) and rope_theta (top level and
# inside rope_parameters) need a conversion; the rest map one to one at the top level.
_ROPE_PATHS = (
    PATH.model.rope_factor,
    PATH.model.original_seq_len,
    PATH.model.beta_fast,
    PATH.model.beta_slow,
    PATH.model.mscale,
    PATH.model.mscale_all_dim,
)
_CONVERTED_PATHS = (PATH.model.q_lora_rank, PATH.model.rope_theta)
HF_Q_LORA_RANK = HF_NAMES[PATH.model.q_lora_rank]
HF_ROPE_THETA = HF_NAMES[PATH.model.rope_theta]
HF_N_HEADS = HF_NAMES[PATH.model.n_heads]
HF_MTP_DEPTH = HF_NAMES[PATH.model.mtp_depth]
HF_MAX_POSITIONS = HF_NAMES[PATH.model.max_seq_len]
HF_ROPE_FACTOR = HF_NAMES[PATH.model.rope_factor]
HF_ORIGINAL_POSITIONS = HF_NAMES[PATH.model.original_seq_len]
# model field name -> HF config.json key, for the fields that map one to one
FIELD_TO_HF = {
    _name(path): hf for path, hf in HF_NAMES.items() if path not in _CONVERTED_PATHS + _ROPE_PATHS
}
# model field name -> key of the HF rope_scaling / rope_parameters dict (yarn only)
ROPE_FIELD_TO_HF = {_name(path): HF_NAMES[path] for path in _ROPE_PATHS}
# what transformers assumes for a yarn key a config leaves out (mscale 0: no such factor)
ROPE_HF_DEFAULTS = {
    HF_NAMES[PATH.model.beta_fast]: 32.0,
    HF_NAMES[PATH.model.beta_slow]: 1.0,
    HF_NAMES[PATH.model.mscale]: 0.0,
    HF_NAMES[PATH.model.mscale_all_dim]: 0.0,
}

# config.json keys: used (fields above, plus these) ...
HF_USED = set(FIELD_TO_HF.values()) | {
    HF_Q_LORA_RANK,
    HF_ROPE_THETA,
    "rope_scaling",
    "rope_parameters",
    "num_mtp_layers",
    "quantization_config",
}
# ... checked against the one value this model implements (None: key may be null) ...
HF_CHECKED = {
    "model_type": lambda v, c: v == "deepseek_v3",
    "attention_bias": lambda v, c: not v,
    "attention_dropout": lambda v, c: not v,
    "hidden_act": lambda v, c: v == "silu",
    "tie_word_embeddings": lambda v, c: not v,
    "num_key_value_heads": lambda v, c: v is None or v == c.get(HF_N_HEADS),
    "rope_interleave": lambda v, c: v,
    "topk_method": lambda v, c: v == "noaux_tc",
    "moe_layer_freq": lambda v, c: v == 1,
    "seq_aux": lambda v, c: v,
    "pretraining_tp": lambda v, c: v in (None, 1),
}
HF_SUPPORTED = {
    "model_type": "deepseek_v3",
    "attention_bias": "false",
    "attention_dropout": "0",
    "hidden_act": "silu",
    "tie_word_embeddings": "false",
    "num_key_value_heads": HF_N_HEADS,
    "rope_interleave": "true",
    "topk_method": "noaux_tc (bias-corrected top-k)",
    "moe_layer_freq": "1 (every layer from first_k_dense_replace on is MoE)",
    "seq_aux": "true (sequence-wise balance loss)",
    "pretraining_tp": "1",
}
# ... or ignored, with the reason (the model section's doc in spec/config.yaml lists them too)
HF_IGNORED = {
    "architectures": "loader metadata",
    "auto_map": "loader metadata (remote code)",
    "transformers_version": "loader metadata",
    "bos_token_id": "tokenizer",
    "eos_token_id": "tokenizer",
    "pad_token_id": "tokenizer",
    "ep_size": "expert-parallel degree of an inference deployment, not the maths",
    "use_cache": "inference",
    "torch_dtype": "storage dtype; weights load as float32",
    "dtype": "storage dtype; weights load as float32",
    "head_dim": "derived by transformers (qk_rope_head_dim)",
    "qk_head_dim": "derived by transformers (qk_nope_head_dim + qk_rope_head_dim)",
    "output_router_logits": "transformers output option",
}
FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size, when quantization_config omits it

# ----------------------------------------------------------------------------- config


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers' DeepseekV3ForCausalLM."""
    if cfg.score_func != ScoreFunc.SIGMOID:
        raise ValueError(
            f"cannot export score_func={cfg.score_func!r}: Hugging Face DeepseekV3 implements only "
            "sigmoid router scoring, so the exported model would compute something else"
        )
    if cfg.norm_eps != 1e-6:
        warnings.warn(
            f"norm_eps={cfg.norm_eps}: transformers' DeepseekV3 uses eps 1e-6 in the q/kv latent norms, "
            "so its outputs will differ slightly from this model's",
            stacklevel=2,
        )
    out = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **{hf: getattr(cfg, f) for f, hf in FIELD_TO_HF.items()},
        HF_Q_LORA_RANK: cfg.q_lora_rank or None,
        "num_key_value_heads": cfg.n_heads,
        "hidden_act": "silu",
        "topk_method": "noaux_tc",
        HF_ROPE_THETA: cfg.rope_theta,
        "rope_parameters": rope_parameters(cfg),
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


def rope_parameters(cfg: ModelConfig) -> dict:
    """HF rope_parameters of a model config: default, or yarn with all its keys."""
    out: dict = {"rope_type": "default", HF_ROPE_THETA: cfg.rope_theta}
    if cfg.rope_scaling == RopeScaling.YARN:
        out["rope_type"] = RopeScaling.YARN.value
        out.update({hf: getattr(cfg, f) for f, hf in ROPE_FIELD_TO_HF.items()})
    return out


def model_fields_from_hf_config(
    config_json: dict, source: str = "config.json"
) -> dict[str, object]:
    """Spec `model` field name -> value, from an HF DeepseekV3 config.json dict.

    Keys missing from config_json are left out (the spec defaults then apply). Every key is used,
    checked (ValueError naming it unless it holds the one supported value) or ignored; a key in
    none of those lists is ignored with a warning naming it.
    """
    c = config_json
    for key, ok in HF_CHECKED.items():
        if key in c and not ok(c[key], c):
            raise ValueError(
                f"{source}: unsupported Hugging Face setting {key}={c[key]!r}; this model "
                f"implements only {key}={HF_SUPPORTED[key]}"
            )
    unknown = sorted(set(c) - HF_USED - set(HF_CHECKED) - set(HF_IGNORED))
    if unknown:
        warnings.warn(
            f"{source}: ignoring unknown Hugging Face config keys {', '.join(unknown)}",
            stacklevel=2,
        )
    fields = {f: c[hf] for f, hf in FIELD_TO_HF.items() if hf in c}
    if HF_MTP_DEPTH not in c and "num_mtp_layers" in c:
        fields[_name(PATH.model.mtp_depth)] = c["num_mtp_layers"]
    if HF_Q_LORA_RANK in c:
        fields[_name(PATH.model.q_lora_rank)] = c[HF_Q_LORA_RANK] or 0
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == RopeScaling.YARN:
        fields[_name(PATH.model.rope_scaling)] = RopeScaling.YARN.value
        if HF_ORIGINAL_POSITIONS not in rope:
            raise ValueError(
                f"{source}: rope_scaling {RopeScaling.YARN} needs {HF_ORIGINAL_POSITIONS}"
            )
        if rope.get("attention_factor") is not None or rope.get("truncate", True) is not True:
            raise ValueError(
                f"{source}: rope_scaling attention_factor / truncate={rope.get('truncate')!r} are not "
                "supported (the attention factor comes from mscale and mscale_all_dim; the "
                "correction range is always truncated, as DeepSeek does)"
            )
        for f, hf in ROPE_FIELD_TO_HF.items():
            value = rope.get(hf)
            if value is None and hf == HF_ROPE_FACTOR:  # transformers' fallback
                value = c[HF_MAX_POSITIONS] / rope[HF_ORIGINAL_POSITIONS]
            fields[f] = ROPE_HF_DEFAULTS[hf] if value is None else value
            if f != _name(PATH.model.original_seq_len):
                fields[f] = float(fields[f])
    elif rope_type != "default":
        raise ValueError(
            f"{source}: rope_scaling type {rope_type!r} is not supported (default or yarn)"
        )
    theta = rope.get(HF_ROPE_THETA, c.get(HF_ROPE_THETA))
    if theta is not None:
        fields[_name(PATH.model.rope_theta)] = float(theta)
    fp8_block(c, source)  # checks quantization_config
    return fields


def fp8_block(config_json: dict, source: str = "config.json") -> tuple[int, int]:
    """Block shape of the FP8 weights' scales, from quantization_config (checked)."""
    q = config_json.get("quantization_config")
    if not q:
        return FP8_BLOCK
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(
            f"{source}: unsupported quantization_config (quant_method={q.get('quant_method')!r}, "
            f"fmt={q.get('fmt')!r}); only DeepSeek's block FP8 (quant_method fp8, fmt e4m3) loads"
        )
    block = q.get("weight_block_size") or FP8_BLOCK
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(
            f"{source}: quantization_config.weight_block_size must be two positive ints, got {block!r}"
        )
    return tuple(block)


# ----------------------------------------------------------------------------- weights


STACKED_EXPERT_KEYS = ("ffn.experts.w13", "ffn.experts.w2")  # (E, ...): one HF tensor per expert


def is_stacked_experts(name: str) -> bool:
    return name.endswith(STACKED_EXPERT_KEYS)


def hf_tensors(
    name: str, t: Tensor, cfg: ModelConfig, first_expert: int = 0
) -> list[tuple[str, Tensor]]:
    """One of our tensors under its Hugging Face name(s), as views of it: routed experts split per
    expert (`t` may be the experts first_expert.. of the stack), MTP modules at layer n_layers + k,
    and the embedding and head also as each MTP layer's own copy (the released weights carry
    them)."""
    n = cfg.n_layers

    def block(prefix: str, key: str) -> list[tuple[str, Tensor]]:
        experts = range(first_expert, first_expert + len(t))  # for the stacked experts
        if key == "ffn.experts.w13":  # (E, 2I, C): gate rows then up rows
            gate, up = t.chunk(2, dim=1)
            return [
                pair
                for i, j in enumerate(experts)
                for pair in (
                    (f"{prefix}mlp.experts.{j}.gate_proj.weight", gate[i]),
                    (f"{prefix}mlp.experts.{j}.up_proj.weight", up[i]),
                )
            ]
        if key == "ffn.experts.w2":  # (E, C, I)
            return [
                (f"{prefix}mlp.experts.{j}.down_proj.weight", t[i]) for i, j in enumerate(experts)
            ]
        return [(prefix + BLOCK_KEYS[key], t)]

    if name in TOP_KEYS:
        copy = {"embed.weight": "embed_tokens.weight", "head.weight": "shared_head.head.weight"}
        if name not in copy:
            return [(TOP_KEYS[name], t)]
        return [(TOP_KEYS[name], t)] + [
            (f"model.layers.{n + k}.{copy[name]}", t) for k in range(cfg.mtp_depth)
        ]
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
        return block(f"model.layers.{m[1]}.", m[2])
    if m := re.fullmatch(r"mtp\.(\d+)\.block\.(.+)", name):
        return block(f"model.layers.{n + int(m[1])}.", m[2])
    if m := re.fullmatch(r"mtp\.(\d+)\.(.+)", name):
        return [(f"model.layers.{n + int(m[1])}.{MTP_KEYS[m[2]]}", t)]
    raise KeyError(f"no Hugging Face name for {name}")


def _stored(t: Tensor, dtype: torch.dtype) -> Tensor:
    # safetensors wants contiguous tensors that share no storage
    return t.detach().to("cpu", dtype).contiguous().clone()


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our state dict under HF names (hf_tensors), float32."""
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        out.update(hf_tensors(name, t, model.config))
    return {k: _stored(v, torch.float32) for k, v in out.items()}


def hf_weight_plan(
    keys: Iterable[str], n_layers: int
) -> tuple[dict[str, tuple], list[tuple[str, str]]]:
    """How each of our tensors is made from a folder's tensors (`keys`: its names, FP8 scales left
    out): our name -> ("copy", key), ("w13", gate keys, up keys) or ("w2", down keys), the
    per-expert keys in expert order. Also the MTP modules' copies of the embedding / head as
    (copy's key, main key): not loaded (DeepSeek's MTP shares the main ones). KeyError naming an
    unexpected key."""
    plan: dict[str, tuple] = {}
    copies: list[tuple[str, str]] = []
    experts: dict[tuple[str, str], dict[int, str]] = {}  # (our prefix, proj) -> expert -> key
    for name in keys:
        if name in TOP_KEYS_INV:
            plan[TOP_KEYS_INV[name]] = ("copy", name)
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            raise KeyError(f"unexpected Hugging Face key {name}")
        i, key = int(m[1]), m[2]
        if i >= n_layers:
            prefix = f"mtp.{i - n_layers}."
            if key in ("embed_tokens.weight", "shared_head.head.weight"):
                copies.append((name, TOP_KEYS[("embed" if key[0] == "e" else "head") + ".weight"]))
                continue
            if key in MTP_KEYS_INV:
                plan[prefix + MTP_KEYS_INV[key]] = ("copy", name)
                continue
            prefix += "block."
        else:
            prefix = f"layers.{i}."
        if e := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", key):
            experts.setdefault((prefix, e[2]), {})[int(e[1])] = name
        elif key == "mlp.experts.gate_up_proj":
            plan[prefix + "ffn.experts.w13"] = ("copy", name)
        elif key == "mlp.experts.down_proj":
            plan[prefix + "ffn.experts.w2"] = ("copy", name)
        elif key in BLOCK_KEYS_INV:
            plan[prefix + BLOCK_KEYS_INV[key]] = ("copy", name)
        else:
            raise KeyError(f"unexpected Hugging Face key {name}")

    def in_order(prefix: str, proj: str) -> tuple[str, ...]:
        d = experts.get((prefix, proj), {})
        if sorted(d) != list(range(len(d))) or not d:
            raise KeyError(f"{prefix}: {proj} weights for experts {sorted(d)}, not 0..n-1")
        return tuple(d[j] for j in range(len(d)))

    for prefix in sorted({p for p, _ in experts}):
        plan[prefix + "ffn.experts.w13"] = (
            "w13",
            in_order(prefix, "gate_proj"),
            in_order(prefix, "up_proj"),
        )
        plan[prefix + "ffn.experts.w2"] = ("w2", in_order(prefix, "down_proj"))
    return plan, copies


def from_hf_state_dict(hf: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """Inverse of to_hf_state_dict; also takes the fused gate_up_proj/down_proj expert layout."""
    plan, copies = hf_weight_plan(hf, n_layers)
    for copy, main in copies:
        if main in hf and not torch.equal(hf[main], hf[copy]):
            warnings.warn(
                f"{copy} differs from the main model's; the main one is used", stacklevel=2
            )
    out: dict[str, Tensor] = {}
    for name, recipe in plan.items():
        if recipe[0] == "copy":
            out[name] = hf[recipe[1]]
        elif recipe[0] == "w13":  # (E, 2I, C): gate rows then up rows
            gate, up = (torch.stack([hf[k] for k in keys]) for keys in recipe[1:])
            out[name] = torch.cat([gate, up], dim=1)
        else:  # (E, C, I)
            out[name] = torch.stack([hf[k] for k in recipe[1]])
    return out


def dequantize_fp8(
    w: Tensor,
    scale_inv: Tensor,
    block: tuple[int, int],
    name: str = "",
    offset: tuple[int, int] = (0, 0),
) -> Tensor:
    """DeepSeek's block FP8 -> float32: w (R, C) float8_e4m3fn, each br x bc block times its scale.
    w may be a block of a larger weight that starts at `offset` (r0, c0); scale_inv then holds the
    scales of the blocks it touches (rows r0 // br .. (r0 + R - 1) // br, likewise for columns).
    Edge blocks may be partial."""
    br, bc = block
    R, C = w.shape
    r0, c0 = offset
    want = (-(-(r0 + R) // br) - r0 // br, -(-(c0 + C) // bc) - c0 // bc)
    if tuple(scale_inv.shape) != want:
        whole = "" if offset == (0, 0) else f" at offset {offset}"
        raise ValueError(
            f"{name}_scale_inv has shape {tuple(scale_inv.shape)}; a {R}x{C} weight{whole} in "
            f"{br}x{bc} blocks needs {want}"
        )
    s = scale_inv.float().repeat_interleave(br, 0)[r0 % br : r0 % br + R]
    s = s.repeat_interleave(bc, 1)[:, c0 % bc : c0 % bc + C]
    return w.float() * s


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a folder: the shards model.safetensors.index.json names, or
    model.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        return ["model.safetensors"]
    with open(index) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def read_safetensors(folder: str) -> dict[str, Tensor]:
    """Every tensor of a folder (model.safetensors, or the shards model.safetensors.index.json
    names), FP8 weights dequantized with their `weight_scale_inv` to float32."""
    from safetensors.torch import load_file

    out: dict[str, Tensor] = {}
    for shard in safetensors_files(folder):
        out.update(load_file(os.path.join(folder, shard)))
    scales = [k for k in out if k.endswith(".weight_scale_inv")]
    if scales or any(t.dtype == torch.float8_e4m3fn for t in out.values()):
        config_path = os.path.join(folder, "config.json")
        with open(config_path) as f:
            block = fp8_block(json.load(f), config_path)
        for k in scales:
            w = k[: -len("_scale_inv")]
            if w not in out:
                raise KeyError(f"{folder}: {k} has no weight {w}")
            out[w] = dequantize_fp8(out[w], out.pop(k), block, w)
        left = [k for k, t in out.items() if t.dtype == torch.float8_e4m3fn]
        if left:
            raise KeyError(f"{folder}: FP8 weights without a weight_scale_inv: {left[:5]}")
    return out


def _parse_size(text: str | int) -> int:
    """'5GB', '200MB', '10KB' or a byte count -> bytes (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    t = text.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export_hf(
    model: Transformer,
    out_dir: str,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    tokenizer: TextCodec | None = None,
    mtp: bool = True,
) -> None:
    """write_hf_folder for a model in memory."""
    write_hf_folder(
        out_dir, model.config, model.state_dict().items(), dtype, max_shard_size, tokenizer, mtp
    )


def write_hf_folder(
    out_dir: str,
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, Tensor]],
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    tokenizer: TextCodec | None = None,
    mtp: bool = True,
) -> None:
    """Write the weights `tensors` ((our name, tensor) pairs of a model of `cfg`; a stack of experts
    may come as several pairs of consecutive experts, in order) and config.json to
    out_dir: model.safetensors, or, above max_shard_size bytes, model-0000i-of-0000n.safetensors
    shards and model.safetensors.index.json. The pairs are taken one at a time and each shard is
    written when full, so at most one shard and one source tensor are in memory (a sharded
    checkpoint exports without ever being whole). dtype float32 or bfloat16 (the router's
    correction bias stays float32, as in DeepSeek's release). The tokenizer's files too when given
    (a runtime.components.tokenizer.TextCodec). `mtp=False` leaves the MTP modules out (and says
    num_nextn_predict_layers 0), so transformers loads the folder without UNEXPECTED keys.
    config.json is written last: a folder without it is no model source."""
    from safetensors.torch import save_file

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be float32 or bfloat16, got {dtype!r}")
    limit = _parse_size(max_shard_size)
    model_cfg = cfg if mtp else dataclasses.replace(cfg, mtp_depth=0)
    config = hf_config(model_cfg)  # refuses softmax scoring before writing anything
    config["torch_dtype"] = config["dtype"] = dtype
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # an earlier export's files would confuse loaders
        if re.fullmatch(
            r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|config\.json", stale
        ):
            os.remove(os.path.join(out_dir, stale))
        elif re.fullmatch(r"model-\d{5}\.safetensors\.partial", stale):
            os.remove(os.path.join(out_dir, stale))
    shards: list[list[str]] = []  # the keys of each shard written
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush() -> None:
        shards.append(list(shard))
        name = f"model-{len(shards):05d}.safetensors.partial"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        shard.clear()

    experts_written: dict[str, int] = {}  # a stack of experts may come in consecutive pieces
    for name, t in tensors:
        if not mtp and name.startswith("mtp."):
            continue
        first = 0
        if is_stacked_experts(name):
            first = experts_written.get(name, 0)
            experts_written[name] = first + t.shape[0]
        for key, v in hf_tensors(name, t, model_cfg, first):
            keep = (
                torch.float32 if key.endswith("e_score_correction_bias") else EXPORT_DTYPES[dtype]
            )
            v = _stored(v, keep)
            n = v.numel() * v.element_size()
            if shard and size + n > limit:  # a tensor above the limit gets a shard of its own
                flush()
                size = 0
            shard[key] = v
            size += n
            total += n
    flush()
    if len(shards) == 1:
        os.replace(
            os.path.join(out_dir, "model-00001.safetensors.partial"),
            os.path.join(out_dir, "model.safetensors"),
        )
    else:
        weight_map = {}
        for i, keys in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            os.replace(
                os.path.join(out_dir, f"model-{i:05d}.safetensors.partial"),
                os.path.join(out_dir, name),
            )
            weight_map.update({k: name for k in keys})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
    if tokenizer is not None:
        tokenizer.save_hf(out_dir, model_max_length=cfg.max_seq_len)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _is_mtp_key(name: str, n_layers: int) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m[1]) >= n_layers


def _user_errors() -> tuple[type[BaseException], ...]:
    from runtime.checkpoint.single_file import CheckpointError

    return (ValueError, KeyError, CheckpointError)


# mistakes `python -m runtime export` reports as one line (runtime/cli/console.py)
USER_ERRORS = _user_errors()


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime export",
        description="Write a checkpoint as a Hugging Face DeepseekV3 folder.",
    )
    parser.add_argument("checkpoint", help="trainer checkpoint file (or a Hugging Face folder)")
    parser.add_argument(
        "out_dir", help="folder to write config.json, the weights and the tokenizer to"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="shard above this many bytes (5GB, 200MB, 1000)"
    )
    parser.add_argument(
        "--no-mtp",
        action="store_true",
        help="leave out the MTP modules (transformers has none and reports their weights as UNEXPECTED keys)",
    )
    args = parser.parse_args(argv)
    from runtime.checkpoint.single_file import CheckpointError
    from runtime.interop.sources import load_source

    try:
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
        )
    except (ValueError, FileNotFoundError, KeyError, CheckpointError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    with torch.device("meta"):
        written = Transformer(dataclasses.replace(cfg, mtp_depth=0) if args.no_mtp else cfg)
    print(f"wrote {args.out_dir} ({written.num_params():,} parameters)")
    return 0
