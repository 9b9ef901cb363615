"""Hugging Face folders written: config.json, safetensors (sharded above a size, with
model.safetensors.index.json), and the tokenizer, so that transformers' from_pretrained and
AutoTokenizer.from_pretrained load them. Names and config.json come from the family's state-dict
adapter (runtime/models/spec.py).

transformers' DeepseekV3ForCausalLM has no MTP module: it reports the MTP layer's weights as
UNEXPECTED keys on load and ignores them (harmless; `mtp=False` writes a folder without them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from generated.config import ModelConfig
from runtime.components.tokenizer import SPECIAL, TextCodec
from runtime.models import StateDictAdapter, get_model_spec, model_config


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
    model: nn.Module,
    out_dir: str,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    tokenizer: TextCodec | None = None,
    mtp: bool = True,
    adapter: StateDictAdapter | None = None,
) -> None:
    """write_hf_folder for a model in memory (its `config`: the model section it was built from)."""
    cfg = model_config(model)
    items = model.state_dict().items()
    write_hf_folder(out_dir, cfg, items, dtype, max_shard_size, tokenizer, mtp, adapter)


def write_hf_folder(
    out_dir: str,
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, Tensor]],
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    tokenizer: TextCodec | None = None,
    mtp: bool = True,
    adapter: StateDictAdapter | None = None,
) -> None:
    """Write the weights `tensors` ((our name, tensor) pairs of a model of `cfg`; a stack of experts
    may come as several pairs of consecutive experts, in order) and config.json to
    out_dir: model.safetensors, or, above max_shard_size bytes, model-0000i-of-0000n.safetensors
    shards and model.safetensors.index.json. The pairs are taken one at a time and each shard is
    written when full, so at most one shard and one source tensor are in memory (a sharded
    checkpoint exports without ever being whole). dtype float32 or bfloat16 (the router's
    correction bias stays float32, as in DeepSeek's release). The tokenizer's files too when given
    (a TextCodec). `mtp=False` leaves the MTP modules out (and says
    num_nextn_predict_layers 0), so transformers loads the folder without UNEXPECTED keys.
    config.json is written last: a folder without it is no model source. `adapter`: the family's
    names and config mapping (the default family's when None)."""
    from safetensors.torch import save_file

    adapter = adapter or get_model_spec().adapter
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be float32 or bfloat16, got {dtype!r}")
    limit = _parse_size(max_shard_size)
    model_cfg = cfg if mtp else dataclasses.replace(cfg, mtp_depth=0)
    config = adapter.hf_config(model_cfg)  # refuses softmax scoring before writing anything
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
        if adapter.is_stacked_experts(name):
            first = experts_written.get(name, 0)
            experts_written[name] = first + t.shape[0]
        for key, v in adapter.hf_tensors(name, t, model_cfg, first):
            keep = (
                torch.float32 if key.endswith("e_score_correction_bias") else EXPORT_DTYPES[dtype]
            )
            v = v.detach().to("cpu", keep).contiguous().clone()  # safetensors: no shared storage
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
        # the special ids travel with the model too: generate() stops at eos, pads with pad
        special = {f"{name}_token_id": getattr(tokenizer, f"{name}_id") for name in SPECIAL}
        config.update(special)
        generation = {k: v for k, v in special.items() if v is not None}
        if generation:
            text = json.dumps({**generation, "_from_model_config": False}, indent=2) + "\n"
            with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
                f.write(text)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
