"""What the tests share (a plain module, not a test module; pytest's fixtures are in conftest.py).

- Paths and processes: REPO (the repository root), PYTHON, ENV and free_port for the tests that
  launch `python -m runtime ...` or torchrun.
- The debug model flavour the unit tests build on: tiny dimensions that run in milliseconds on
  CPU. Each test states only what it changes: `debug_model_config(n_layers=3, mtp_depth=1)`.
- The same kind of model for end-to-end trainer tests, as command-line flags (TINY_RUN_FLAGS),
  the trainer's argv and a run of it (trainer_args, run_trainer), and readers of a run's
  metrics.jsonl (metrics, losses).
- Hugging Face interop: a random model with non-trivial weights (make_model), transformers'
  model of an exported folder (load_hf), and a tiny folder in DeepSeek-V3's released format
  (block FP8 weights in shards, write_release_folder).
"""

import json
import math
import os
import socket
import sys
from pathlib import Path

import torch

from generated.config import ModelConfig, MoETrainingConfig, MTPTrainingConfig
from generated.parser import load_config
from runtime.components.loss import TrainingLoss
from runtime.models.deepseek_v3 import state_dict_adapter as hf_mod
from runtime.models.deepseek_v3.model import Transformer
from runtime.models.deepseek_v3.moe import RoutingKnobs
from runtime.trainer.trainer import Trainer
from runtime.utils.faults import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]

# --- subprocesses and torchrun -------------------------------------------------------------------

PYTHON = sys.executable
# one thread per process (tiny models; several processes share two cores), the repository
# importable from anywhere, and never an inherited fault-injection plan
ENV = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
ENV.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the debug model flavour -----------------------------------------------------------------------

DEBUG_MODEL = dict(
    vocab_size=64,
    dim=32,
    inter_dim=64,
    moe_inter_dim=16,
    n_layers=2,
    first_k_dense=1,
    n_heads=2,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_seq_len=64,
    n_routed_experts=4,
    top_k=2,
    mtp_depth=0,
)


def debug_model_config(**overrides):
    return ModelConfig(**{**DEBUG_MODEL, **overrides})


def debug_model(moe=None, **overrides):
    """A seeded Transformer of the debug flavour; `moe` (a MoETrainingConfig) gives its routing knobs."""
    torch.manual_seed(0)
    knobs = RoutingKnobs.from_config(moe) if moe is not None else None
    return Transformer(debug_model_config(**overrides), knobs)


def training_loss(moe=None, mtp=None):
    """The trainer's loss for these sections (spec defaults where None)."""
    return TrainingLoss(moe or MoETrainingConfig(), mtp or MTPTrainingConfig())


# --- end-to-end trainer runs -----------------------------------------------------------------------

# The same kind of model for end-to-end trainer tests, as command-line flags.
TINY_RUN_FLAGS = [
    "--model.dim", "32", "--model.inter_dim", "64", "--model.moe_inter_dim", "32", "--model.n_layers", "2",
    "--model.n_heads", "2", "--model.kv_lora_rank", "16", "--model.qk_nope_head_dim", "16",
    "--model.qk_rope_head_dim", "8", "--model.v_head_dim", "16", "--model.n_routed_experts", "4",
    "--model.max_seq_len", "32", "--training.seq_len", "16", "--training.batch_size", "2",
    "--sample.max_new_tokens", "8",
]  # fmt: skip

# What a trainer run uses unless a test says otherwise: short evaluations and schedules, a log
# line (and a metrics row) every step.
TRAIN_FLAGS = TINY_RUN_FLAGS + [
    "--evaluator.eval_iters", "2", "--schedule.warmup_iters", "1", "--schedule.lr_decay_iters", "20",
    "--training.log_interval", "1",
]  # fmt: skip


def trainer_args(out_dir, data_dir, *extra, flags=TRAIN_FLAGS):
    """The trainer's command line: `flags`, the run's folder and corpus cache, then `extra` (later
    flags win)."""
    return [*flags, "--out_dir", str(out_dir), "--data.data_dir", str(data_dir), *extra]


def run_trainer(out_dir, data_dir, *extra, flags=TRAIN_FLAGS):
    """Build the Trainer of `trainer_args(...)` in this process and run it to the end."""
    trainer = Trainer(load_config(argv=trainer_args(out_dir, data_dir, *extra, flags=flags)))
    assert trainer.run() == 0
    return trainer


def metrics(out_dir):
    """The rows of a run's metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir, key="loss"):
    """One metric (a training loss by default) of every row that has it."""
    return [r[key] for r in metrics(out_dir) if key in r]


# --- Hugging Face interop --------------------------------------------------------------------------


def make_model(**kw):
    """A seeded model of a small DeepSeek-V3 architecture (`kw` changes it), in eval mode, with
    larger weights than the init: routing and logits are less flat."""
    base = dict(
        vocab_size=256,
        dim=64,
        inter_dim=96,
        moe_inter_dim=32,
        n_layers=3,
        first_k_dense=1,
        n_heads=4,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_seq_len=64,
        rope_theta=500.0,
        n_routed_experts=8,
        n_shared_experts=1,
        top_k=3,
        n_group=4,
        topk_group=2,
        route_scale=2.5,
        mtp_depth=1,
    )
    base.update(kw)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**base))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for _, layer in model.moe_layers():
            layer.gate.e_score_correction_bias.normal_(0, 0.05)
    return model.eval()


def load_hf(folder):
    """transformers' DeepseekV3ForCausalLM of a folder, in eval mode; every weight from the files."""
    import transformers

    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert (
        info["missing_keys"] == set() or info["missing_keys"] == []
    )  # every HF weight came from the file
    assert info["mismatched_keys"] == set() or info["mismatched_keys"] == []
    return model.eval()


RELEASED = str(REPO / "tests" / "data" / "deepseek_v3_config.json")  # DeepSeek-V3's, unchanged


def released():
    with open(RELEASED) as f:
        return json.load(f)


def quantize_fp8(w, block=(128, 128)):
    """DeepSeek's block FP8: per block scale = amax / 448; returns (fp8 weight, weight_scale_inv)."""
    R, C = w.shape
    br, bc = block
    scale = torch.empty(math.ceil(R / br), math.ceil(C / bc))
    q = torch.empty(R, C, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_loop(q, scale, block=(128, 128)):
    out = q.float()
    br, bc = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * br : (i + 1) * br, j * bc : (j + 1) * bc] *= scale[i, j]
    return out


TINY_RELEASE = dict(  # the released config's keys with dimensions small enough for CPU
    hidden_size=144,
    intermediate_size=160,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    vocab_size=256,
    max_position_embeddings=64,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    rope_scaling={**released()["rope_scaling"], "original_max_position_embeddings": 16},
)
FP8_SUFFIXES = ("_proj.weight", "kv_a_proj_with_mqa.weight")  # linear layers, as in the release


def write_release_folder(tmp_path):
    """(fp8 folder, dequantized reference folder, dequantized HF tensors) of a random tiny model,
    in the released layout: 3 shards + index, FP8 linear weights with 128x128 weight_scale_inv,
    bf16 elsewhere, fp32 correction bias, MTP layer at index num_hidden_layers."""
    c = {**released(), **TINY_RELEASE}
    fields = hf_mod.model_fields_from_hf_config(c)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**fields))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for _, layer in model.moe_layers():
            layer.gate.e_score_correction_bias.normal_(0, 0.05)
    sd = hf_mod.to_hf_state_dict(model)
    stored, dequant = {}, {}
    for k, v in sd.items():
        if k.endswith(FP8_SUFFIXES) and "eh_proj" not in k:
            q, s = quantize_fp8(v)
            stored[k], stored[k + "_scale_inv"] = q, s
            dequant[k] = dequantize_loop(q, s)
        elif k.endswith("e_score_correction_bias"):
            stored[k] = dequant[k] = v
        else:
            stored[k] = v.to(torch.bfloat16)
            dequant[k] = stored[k].float()
    from safetensors.torch import save_file

    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    (fp8 / "config.json").write_text(json.dumps(c, indent=2))
    keys = sorted(stored)
    weight_map = {}
    for i, part in enumerate([keys[0::3], keys[1::3], keys[2::3]], start=1):
        name = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: stored[k] for k in part}, str(fp8 / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (fp8 / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    ref = tmp_path / "ref"
    ref.mkdir()
    ref_config = {k: v for k, v in c.items() if k not in ("quantization_config", "auto_map")}
    ref_config.update(bos_token_id=None, eos_token_id=None, torch_dtype="float32")
    (ref / "config.json").write_text(json.dumps(ref_config))
    save_file(dequant, str(ref / "model.safetensors"), metadata={"format": "pt"})
    return fp8, ref, dequant


# --- your own corpus ---------------------------------------------------------------------------

CORPUS = [
    f"record {i}: " + " ".join(f"w{(i * j) % 17}" for j in range(8 + i % 9)) for i in range(160)
]


def make_tokenizer(folder, texts=CORPUS, vocab=300):
    """A byte-level BPE of `vocab` ids plus `<eos>` and `<bos>`, saved as a Hugging Face folder
    (tokenizer.json, and tokenizer_config.json naming them): a released tokenizer in miniature."""
    from runtime.components.tokenizer import TextCodec

    codec = TextCodec.train_bpe(texts, vocab)
    codec.tokenizer.add_special_tokens(["<eos>", "<bos>"])
    codec.eos_id = codec.tokenizer.token_to_id("<eos>")
    codec.bos_id = codec.tokenizer.token_to_id("<bos>")
    codec.kind = "pretrained"
    os.makedirs(folder, exist_ok=True)
    codec.save_hf(str(folder))
    return str(folder)


def write_jsonl(path, texts, field="text"):
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({field: text}) + "\n")
    return str(path)


def torchrun_args(n):
    """The launcher's command line for `n` local processes (gloo on CPU)."""
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
