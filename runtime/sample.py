"""Text generation with byte-level tokens.

`python -m runtime sample SOURCE --prompt TEXT --max-new-tokens N --temperature T [--json]`
where SOURCE is a trainer checkpoint file or a Hugging Face folder. Temperature 0 is greedy.
No KV cache: each step reruns the (cropped) context, which is fine at these model sizes.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import Tensor, nn

from generated import FIELDS, PATH


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Tensor | list[int],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extend prompt_ids ((B, T) or (T,) or a list) by max_new_tokens tokens -> (B, T + max_new_tokens).

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
    max_len = model.config.max_seq_len
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(idx[:, -max_len:])[:, -1, :].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                if generator is not None:
                    probs = probs.to(generator.device)
                nxt = torch.multinomial(probs, 1, generator=generator).to(device)
            idx = torch.cat([idx, nxt], dim=1)
    finally:
        model.train(was_training)
    return idx


def decode(ids: list[int]) -> str:
    return bytes(t for t in ids if 0 <= t < 256).decode("utf-8", errors="replace")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime sample", description="Generate text from a model."
    )
    parser.add_argument("source", help="trainer checkpoint file or Hugging Face folder")
    defaults = {name: FIELDS[getattr(PATH.sample, name)].default for name in ("prompt", "max_new_tokens", "temperature")}
    parser.add_argument("--prompt", default=defaults["prompt"], help="prompt text (UTF-8 bytes are the tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults["max_new_tokens"])
    parser.add_argument("--temperature", type=float, default=defaults["temperature"], help="0 = greedy")
    parser.add_argument("--seed", type=int, default=FIELDS[PATH.seed].default)
    parser.add_argument("--device", default=FIELDS[PATH.system.device.device].default)
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"token_ids": [...], "text": ...} of the new tokens',
    )
    args = parser.parse_args(argv)

    from runtime.hf import load_model_source

    prompt = args.prompt.encode("utf-8")
    try:
        model = load_model_source(args.source, device=args.device)
        if not prompt:
            raise ValueError("--prompt must not be empty")
        if model.config.vocab_size < 256 and max(prompt) >= model.config.vocab_size:
            raise ValueError(
                f"prompt has bytes outside the model's vocabulary of {model.config.vocab_size}"
            )
        if args.max_new_tokens < 0:
            raise ValueError("--max-new-tokens must be >= 0")
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        out = generate(model, list(prompt), args.max_new_tokens, args.temperature, generator)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 1
    new_ids = out[0, len(prompt) :].tolist()
    if args.json:
        print(json.dumps({"prompt": args.prompt, "token_ids": new_ids, "text": decode(new_ids)}))
    else:
        print(args.prompt + decode(new_ids))
    return 0
