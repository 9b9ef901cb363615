"""Text generation with DeepSeek-V3: temperature, top-k and top-p sampling with the MLA KV cache.

The cache (model.py: MLACache) keeps the compressed latent and the rope key per layer, so each new
token costs time linear in the context; once the context passes max_seq_len, every step re-reads
the last max_seq_len tokens (a sliding window, the same tokens the uncached path sees). Temperature
0 is greedy.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from runtime.models.deepseek_v3.model import Transformer


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits (B, V) with everything outside the top_k (0: no limit) and outside the smallest set
    whose probability reaches top_p (1.0: no limit) set to -inf; the best token always stays."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@overload
def generate(
    model: Transformer,
    prompt_ids: Tensor | list[int],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    return_logits: Literal[False] = False,
) -> Tensor: ...


@overload
def generate(
    model: Transformer,
    prompt_ids: Tensor | list[int],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    *,
    return_logits: Literal[True],
) -> tuple[Tensor, Tensor]: ...


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: Tensor | list[int],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Extend prompt_ids ((B, T) or (T,) or a list) by max_new_tokens tokens -> (B, T + max_new_tokens)
    (and, with return_logits, the (B, max_new_tokens, V) logits each token was drawn from).

    The model runs in eval mode (no router noise) and gets its previous mode back afterwards.
    Sampling draws from `generator` (on the generator's device); temperature 0 takes the argmax.
    """
    device = next(model.parameters()).device
    idx = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.shape[1] == 0:
        raise ValueError("generate needs a non-empty prompt")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    filter_logits(torch.zeros(1, 2), top_k, top_p)  # argument errors before any work
    max_len = model.config.max_seq_len
    was_training = model.training
    model.eval()
    cache, seen = None, []
    try:
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = model(idx[:, -max_len:]).logits[:, -1, :]
            elif cache is None or cache.pos + 1 > max_len:
                cache = model.new_cache()  # (re)fill with the last max_len tokens
                logits = model(idx[:, -max_len:], cache=cache).logits[:, -1, :]
            else:
                logits = model(idx[:, -1:], cache=cache).logits[:, -1, :]
            logits = logits.float()  # (B, V)
            if return_logits:
                seen.append(logits)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
                if generator is not None:
                    probs = probs.to(generator.device)
                nxt = torch.multinomial(probs, 1, generator=generator).to(device)
            idx = torch.cat([idx, nxt], dim=1)
    finally:
        model.train(was_training)
    if return_logits:
        return idx, torch.stack(seen, dim=1) if seen else idx.new_zeros(idx.shape[0], 0, 0).float()
    return idx
