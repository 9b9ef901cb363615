"""The Hugging Face state-dict adapter of DeepSeek-V3: names and config mapping, both ways.

A Hugging Face DeepseekV3ForCausalLM folder (read and written by runtime/interop/) holds config.json
(model_type deepseek_v3) and safetensors under the released DeepSeek-V3 key names: per-expert
`mlp.experts.{j}.{gate,up,down}_proj.weight` (transformers fuses them into gate_up_proj/down_proj
on load; fused keys are accepted on import too) and the MTP modules at layer index
`num_hidden_layers + k` (embed_tokens, enorm, hnorm, eh_proj, shared_head.norm, shared_head.head and
the block's usual names). Every config.json key is used, checked against the one value this model
implements (ValueError naming it) or ignored (HF_IGNORED, also listed in the spec's model section
doc); quantization_config gives the block shape of DeepSeek's FP8 weights (fp8_block).
transformers itself is not imported.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from generated import HF_NAMES, PATH
from generated.config import ModelConfig
from generated.names import RopeScaling, ScoreFunc

if TYPE_CHECKING:
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
