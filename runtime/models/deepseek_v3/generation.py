"""Text generation: temperature, top-k and top-p sampling with an MLA KV cache.

`python -m runtime sample SOURCE --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
[--top-p P] [--json]` where SOURCE is a trainer checkpoint file, a sharded checkpoint folder or a
Hugging Face folder. Temperature 0 is greedy. The prompt is encoded and the output decoded with the model's tokenizer (runtime/
tokenizer.py: bytes, or the run's BPE). The cache (runtime/models/deepseek_v3/model.py: MLACache) keeps the compressed
latent and the rope key per layer, so each new token costs time linear in the context; once the
context passes max_seq_len, every step re-reads the last max_seq_len tokens (a sliding window, the
same tokens the uncached path sees).

Under torchrun (WORLD_SIZE > 1) the model is sharded instead of held whole by one process, as in
training: built on the meta device, FSDP2 over WORLD_SIZE / E processes x `--expert-parallel E`,
each process reading only its blocks of the weights (runtime/interop/sources.py). Every process runs the
same forwards (each gathers the FSDP shards or sends tokens to the experts' processes) and rank 0
prints. A model too big for one process's memory samples this way:

    torchrun --nproc_per_node 8 -m runtime sample CHECKPOINT --prompt TEXT --expert-parallel 8

`--json` prints one object: `prompt` (the text given), `prompt_ids` (its token ids), `token_ids`
(the new tokens' ids, max_new_tokens of them), `text` (the new tokens decoded), `tokenizer`
(`bytes` or `bpe`) and `settings` (temperature, top_k, top_p, seed, kv_cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Literal, overload

import torch
from torch import Tensor

from generated import FIELDS, PATH
from generated.config import DeviceConfig, DistributedConfig, SampleConfig
from runtime.checkpoint.single_file import CheckpointError
from runtime.components.tokenizer import TextCodec
from runtime.models.deepseek_v3.model import Transformer

if TYPE_CHECKING:
    from runtime.interop.sources import Source


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


# mistakes `python -m runtime` reports as one line (runtime/cli/console.py)
USER_ERRORS = (ValueError, KeyError, CheckpointError)


def complete(
    model: Transformer,
    prompt: list[int],
    settings: SampleConfig,
    generator: torch.Generator | None = None,
) -> list[int]:
    """prompt ids and their continuation under `settings` (the `sample` section, SampleConfig), as
    the trainer's end-of-run sample does it: prompt tokens outside the vocabulary are dropped ([0]
    if none is left) and at most max_seq_len - len(prompt) tokens (at least one) are added."""
    prompt = [t for t in prompt if t < model.config.vocab_size] or [0]
    room = max(1, model.config.max_seq_len - len(prompt))
    ids = generate(
        model,
        prompt,
        min(settings.max_new_tokens, room),
        settings.temperature,
        generator,
        top_k=settings.top_k,
        top_p=settings.top_p,
    )
    return ids[0].tolist()


def decode(codec: TextCodec | None, ids: list[int]) -> str:
    """Text of token ids with the model's tokenizer; space-separated ids without one (a
    pre-tokenized corpus)."""
    return codec.decode(ids) if codec is not None else " ".join(str(int(t)) for t in ids)


def build_sharded_model(source: Source, expert_parallel: int, device_name: str) -> Transformer:
    """Under torchrun: the source's model built on the meta device and sharded over the launch,
    FSDP2 over WORLD_SIZE / expert_parallel processes x expert_parallel, each process reading only
    the blocks of the weights it holds. Every process must then run the same forwards."""
    from runtime.distributed import utils as dist_utils
    from runtime.models.deepseek_v3 import parallelize as parallel

    world, rank, local_rank = dist_utils.launch_world()
    cfg = source.model_config()
    if expert_parallel < 1 or world % expert_parallel:
        raise ValueError(f"--expert-parallel {expert_parallel} must divide WORLD_SIZE={world}")
    if cfg.n_routed_experts % expert_parallel:
        raise ValueError(
            f"--expert-parallel {expert_parallel} must divide the model's "
            f"{cfg.n_routed_experts} routed experts"
        )
    dist_cfg = DistributedConfig(
        enabled=True, dp_shard=world // expert_parallel, expert_parallel=expert_parallel
    )
    device = dist_utils.resolve_device(DeviceConfig(device=device_name), local_rank, True)
    launch = dist_utils.DistInfo(world, rank, local_rank, True)
    dist_utils.init_distributed(launch, dist_cfg, device.type)
    with torch.device("meta"):
        model = Transformer(cfg, source.knobs)
    parallel.apply(model, dist_cfg, parallel.resolve_layout(dist_cfg, world), device)
    model.to_empty(device=device)
    model.init_weights()  # the rotary tables; every weight is then read from the source
    source.load_weights(model)
    return model.eval()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime sample", description="Generate text from a model."
    )
    parser.add_argument(
        "source", help="trainer checkpoint file, sharded checkpoint folder or Hugging Face folder"
    )
    # defaults: the spec's `sample` section (the trainer's final sample uses the same fields)
    defaults = {
        name: FIELDS[getattr(PATH.sample, name)].default
        for name in ("prompt", "max_new_tokens", "temperature", "top_k", "top_p")
    }
    parser.add_argument(
        "--prompt",
        default=defaults["prompt"],
        help="prompt text (encoded with the model's tokenizer)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=defaults["max_new_tokens"])
    parser.add_argument(
        "--temperature", type=float, default=defaults["temperature"], help="0 = greedy"
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=defaults["top_k"],
        help="sample among the k likeliest tokens (0: all)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=defaults["top_p"],
        help="nucleus: the likeliest tokens up to this mass",
    )
    parser.add_argument("--seed", type=int, default=FIELDS[PATH.seed].default)
    parser.add_argument("--device", default=FIELDS[PATH.system.device.device].default)
    parser.add_argument(
        "--no-kv-cache", action="store_true", help="rerun the whole context every token"
    )
    parser.add_argument(
        "--expert-parallel",
        type=int,
        default=FIELDS[PATH.system.distributed.expert_parallel].default,
        help="under torchrun: split the routed experts over this many processes (the rest FSDP2)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: prompt, prompt_ids, token_ids, text, tokenizer, settings",
    )
    args = parser.parse_args(argv)

    from runtime.checkpoint.single_file import CheckpointError
    from runtime.distributed import utils as dist_utils
    from runtime.interop.sources import load_source

    world, rank, _ = dist_utils.launch_world()
    model: Transformer | None = None
    try:
        source = load_source(args.source)
        codec = source.tokenizer
        if world > 1:
            model = build_sharded_model(source, args.expert_parallel, args.device)
        elif args.expert_parallel != 1:
            raise ValueError("--expert-parallel needs several processes: launch with torchrun")
        else:
            model = source.build_model(args.device)
        if codec is None:  # a pre-tokenized corpus: the prompt is space-separated token ids
            prompt = [int(t) for t in args.prompt.split()]
        else:
            prompt = codec.encode(args.prompt)
        if not prompt:
            raise ValueError("--prompt must not be empty")
        if max(prompt) >= model.config.vocab_size:
            raise ValueError(
                f"prompt has tokens outside the model's vocabulary of {model.config.vocab_size}"
            )
        if args.max_new_tokens < 0:
            raise ValueError("--max-new-tokens must be >= 0")
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        out = generate(
            model,
            prompt,
            args.max_new_tokens,
            args.temperature,
            generator,
            top_k=args.top_k,
            top_p=args.top_p,
            use_cache=not args.no_kv_cache,
        )
    except (ValueError, FileNotFoundError, KeyError, CheckpointError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 1
    finally:
        if world > 1:  # the sharded model goes before its process groups (dist_utils.shutdown)
            model = None
            dist_utils.shutdown()
    if rank != 0:
        return 0
    new_ids = out[0, len(prompt) :].tolist()
    text = decode(codec, new_ids)
    if args.json:
        settings = {
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
            "kv_cache": not args.no_kv_cache,
        }
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "prompt_ids": prompt,
                    "token_ids": new_ids,
                    "text": text,
                    "tokenizer": codec.kind if codec is not None else None,
                    "settings": settings,
                }
            )
        )
    else:
        print(args.prompt + text if codec is not None else text)
    return 0
