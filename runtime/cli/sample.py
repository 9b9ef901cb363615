"""`deepseek-moe sample SOURCE --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
[--top-p P] [--json]`: text from a model source (a trainer checkpoint file, a sharded checkpoint
folder or a Hugging Face folder), encoded and decoded with its tokenizer, sampled by its family's
generate (runtime/models/deepseek_v3/generation.py: the MLA latent cache).

Under torchrun (WORLD_SIZE > 1) the model is sharded instead of held whole by one process, as in
training (runtime/models/build.py): built on the meta device, FSDP2 over WORLD_SIZE / E processes x
`--expert-parallel E`, each process reading only its blocks of the weights. Every process runs the
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

import torch
from torch import nn

from generated import FIELDS, PATH
from generated.config import DeviceConfig, DistributedConfig
from runtime.checkpoint.format import CheckpointError
from runtime.cli import console
from runtime.components.tokenizer import decode
from runtime.distributed import utils as dist_utils
from runtime.interop.sources import Source, load_source
from runtime.models import model_config
from runtime.models.build import build_model

PROG = "sample"
# mistakes reported as one line, exit 1
USER_ERRORS = (ValueError, KeyError, CheckpointError)


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
    return console.run_command(PROG, lambda: _sample(args), USER_ERRORS)


def sharded_model(source: Source, expert_parallel: int, device_name: str) -> nn.Module:
    """Under torchrun: the source's model sharded over the launch, FSDP2 over WORLD_SIZE /
    expert_parallel processes x expert_parallel, each process reading only the blocks of the
    weights it holds. Every process must then run the same forwards."""
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
    model, _ = build_model(
        source.spec, cfg, source.moe, dist_cfg, world, device, source.load_weights,
        is_main=rank == 0,
    )  # fmt: skip
    return model.eval()


def _sample(args: argparse.Namespace) -> int:
    world, rank, _ = dist_utils.launch_world()
    model: nn.Module | None = None
    try:
        source = load_source(args.source)
        codec = source.tokenizer
        if world > 1:
            model = sharded_model(source, args.expert_parallel, args.device)
        elif args.expert_parallel != 1:
            raise ValueError("--expert-parallel needs several processes: launch with torchrun")
        else:
            model = source.build_model(args.device)
        cfg = model_config(model)
        if codec is None:  # token ids without a tokenizer: the prompt is space-separated ids
            try:
                prompt = [int(t) for t in args.prompt.split()]
            except ValueError:
                console.error(
                    PROG,
                    f"{args.source} has no text tokenizer (it was trained on token ids): --prompt "
                    f"takes token ids separated by spaces, got {args.prompt!r}",
                )
                return console.EXIT_USAGE
        else:
            prompt = codec.encode(args.prompt)
        if not prompt:
            raise ValueError("--prompt must not be empty")
        if max(prompt) >= cfg.vocab_size:
            raise ValueError(
                f"prompt has tokens outside the model's vocabulary of {cfg.vocab_size}"
            )
        if args.max_new_tokens < 0:
            raise ValueError("--max-new-tokens must be >= 0")
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        out = source.spec.generate(
            model,
            prompt,
            args.max_new_tokens,
            args.temperature,
            generator,
            top_k=args.top_k,
            top_p=args.top_p,
            use_cache=not args.no_kv_cache,
        )
    finally:
        if world > 1:  # the sharded model goes before its process groups (dist_utils.shutdown)
            model = None
            dist_utils.shutdown()
    if rank != 0:
        return console.EXIT_OK
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
        record = {
            "prompt": args.prompt,
            "prompt_ids": prompt,
            "token_ids": new_ids,
            "text": text,
            "tokenizer": codec.kind if codec is not None else None,
            "settings": settings,
        }
        print(json.dumps(record))
    else:
        print(args.prompt + text if codec is not None else text)
    return console.EXIT_OK
