"""Generation: runtime/models/deepseek_v3/generation.py's `generate` with the MLA latent KV cache against Hugging Face
transformers' `generate` (its DynamicCache) on the same model and weights: greedy, batch 1, fp32.

The model is the trainer bench's (bench/trainer_bench.py) with its output head scaled up so greedy
choices are clear-cut (a fresh model's logits are nearly flat, and a 1e-6 difference between two
correct implementations could then flip an argmax). Both must produce the same tokens: the bench
checks that before timing and stops if they differ. Timed round-robin, medians.
"""

from __future__ import annotations

import torch

from generated.config import ModelConfig
from runtime.models.deepseek_v3.generation import generate
from runtime.models.deepseek_v3.model import Transformer
from runtime.models.deepseek_v3.state_dict_adapter import hf_config

from .common import Target, interleaved_medians, spread
from .trainer_bench import BENCH_MODEL, _hf_state_dict

N_EXPERTS, PROMPT, NEW_TOKENS, HEAD_SCALE = 16, 32, 256, 50.0
GENERATION_VS_HF = 1.5  # the target


def first_mismatch(ours: torch.Tensor, theirs: torch.Tensor) -> int | None:
    """Index of the first position where two (B, T) token sequences differ (over all rows), or None
    if they are equal; a length difference counts as a mismatch at the shorter length."""
    n = min(ours.shape[-1], theirs.shape[-1])
    differs = (ours[..., :n] != theirs[..., :n]).any(dim=0).nonzero()
    if len(differs):
        return int(differs[0])
    return None if ours.shape == theirs.shape else n


def _models(max_seq_len: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        **BENCH_MODEL, n_routed_experts=N_EXPERTS, max_seq_len=max_seq_len, mtp_depth=0
    )
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        ours.head.weight.mul_(HEAD_SCALE)
    peer = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_config(cfg)))
    peer.load_state_dict(_hf_state_dict(ours), strict=True)
    return ours, peer.eval()


def cache_bytes_per_token(cfg: ModelConfig) -> dict[str, int]:
    """fp32 bytes each token adds to the cache: our latent + rope key, HF's full keys and values."""
    ours = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * 4
    hf = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return {"ours": ours, "hf": hf * cfg.n_layers * 4}


def run(quick=False):
    new_tokens = 32 if quick else NEW_TOKENS
    repeats = 1 if quick else 3
    ours, peer = _models(PROMPT + new_tokens)
    prompt = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))

    def run_ours():
        return generate(ours, prompt, new_tokens, temperature=0.0, use_cache=True)

    def run_hf():
        with torch.no_grad():
            return peer.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True)

    a, b = run_ours(), run_hf()  # also the warm-up
    mismatch = first_mismatch(a, b)
    assert mismatch is None, (
        f"greedy tokens differ from HF's at position {mismatch}: {a[0, PROMPT:].tolist()} vs "
        f"{b[0, PROMPT:].tolist()}"
    )
    samples = {}
    times = interleaved_medians(
        {"ours": run_ours, "hf": run_hf}, repeats, warmup=0, samples=samples
    )
    tps = {k: new_tokens / v for k, v in times.items()}
    cache = cache_bytes_per_token(ours.config)
    distinct = len(set(a[0, PROMPT:].tolist()))
    return {
        "targets": [
            Target(
                f"generation tokens/s vs HF generate, {N_EXPERTS} experts (greedy, KV cache)",
                tps["ours"] / tps["hf"],
                GENERATION_VS_HF,
                True,
                detail=f"{new_tokens} new tokens after {PROMPT}, batch 1, fp32: ours {tps['ours']:.1f} tok/s, "
                f"HF {tps['hf']:.1f} tok/s; greedy tokens equal: {mismatch is None} ({distinct} distinct); "
                f"cache {cache['ours']} vs {cache['hf']} bytes/token",
            )
        ],
        "figures": {
            "experts": N_EXPERTS,
            "prompt_tokens": PROMPT,
            "new_tokens": new_tokens,
            "head_scale": HEAD_SCALE,
            "tokens_equal": mismatch is None,
            "tokens": a[0, PROMPT:].tolist(),
            "tokens_per_s": tps,
            "max_over_min": spread(samples),
            "cache_bytes_per_token": cache,
        },
    }
