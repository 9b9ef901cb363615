"""One MoE layer (forward + backward) against a dense SwiGLU of the same active FLOPs, and its
scaling with the number of routed experts.

Workload: N tokens of width C through one DeepSeekMoE layer (top-2 of E routed SwiGLU experts of
hidden I, sigmoid router, no shared expert) and, as the baseline, through the model's own dense
SwiGLU MLP of hidden top_k * I: the same active expert FLOPs on the same tokens. The MoE time
includes everything the layer does (router, top-k, sort, dispatch, combine, balance loss); the
per-expert loop is `Experts.forward_reference` behind the same router. Every backward gets the same
fixed upstream gradient, parameter grads are reset to None before each run (as a training step's
zero_grad does), and all variants run round-robin so machine noise hits them alike.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from generated.config import ModelConfig
from runtime.models.deepseek_v3.model import MLP
from runtime.models.deepseek_v3.moe import MoE, RoutingKnobs

from .common import Target, interleaved_medians, profile_summary, spread

DIM, INTER, TOP_K = 512, 256, 2
EXPERTS = (8, 16, 32, 64)
SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.unique", "aten.tolist")


class _SyncCounter(TorchDispatchMode):
    """Counts the host-synchronising ops (data-dependent scalars or shapes) issued at the Python
    level; what a C++ kernel does inside (e.g. the CPU grouped-mm reading its offsets) is not seen.
    """

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _moe(n_experts: int) -> MoE:
    cfg = ModelConfig(
        dim=DIM, moe_inter_dim=INTER, n_routed_experts=n_experts, top_k=TOP_K, n_shared_experts=0
    )
    layer = MoE(cfg, RoutingKnobs(), None)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return layer.train()


def _runner(module, x, grad, reference=False):
    params = list(module.parameters())

    def run():
        x.grad = None
        for p in params:
            p.grad = None
        if isinstance(module, MoE):
            y, aux, _ = module(x, reference=reference)
            torch.autograd.backward((y, aux), (grad, torch.ones_like(aux)))
        else:
            module(x).backward(grad)

    return run


def run(quick=False, tokens=None, experts=EXPERTS, repeats=None):
    tokens = tokens or (2048 if quick else 8192)
    repeats = repeats or (3 if quick else 9)
    torch.manual_seed(0)
    x = torch.randn(1, tokens, DIM, requires_grad=True)
    grad = torch.randn(1, tokens, DIM)
    dense = MLP(DIM, TOP_K * INTER)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layers = {e: _moe(e) for e in experts}
    functions = {"dense": _runner(dense, x, grad)}
    for e, layer in layers.items():
        functions[f"moe{e}"] = _runner(layer, x, grad)
        functions[f"loop{e}"] = _runner(layer, x, grad, reference=True)
    samples = {}
    times = interleaved_medians(functions, repeats, warmup=1, samples=samples)

    # routing balance at init (the grouped kernels' per-expert row counts) and host syncs per call
    loads, syncs = {}, {}
    for e, layer in layers.items():
        with torch.no_grad():
            idx = layer.route(x.detach().view(tokens, DIM)).idx
        counts = torch.bincount(idx.flatten(), minlength=e).float()
        loads[e] = {
            "rows_per_expert_mean": counts.mean().item(),
            "max_over_mean": (counts.max() / counts.mean()).item(),
        }
        for name, reference in (("grouped", False), ("loop", True)):
            with _SyncCounter() as counter:
                _runner(layer, x, grad, reference)()
            syncs.setdefault(name, {})[e] = counter.count
    big = max(experts)
    profile = profile_summary(functions[f"moe{big}"], steps=1)

    dense_ms = times["dense"] * 1e3
    ms = {k: v * 1e3 for k, v in times.items()}
    ratio = ms[f"moe{big}"] / dense_ms
    scale = ms[f"moe{big}"] / ms[f"moe{min(experts)}"]
    loop_scale = ms[f"loop{big}"] / ms[f"loop{min(experts)}"]
    sweep = ", ".join(f"{e}: {ms[f'moe{e}']:.0f}" for e in experts)
    loop_sweep = ", ".join(f"{e}: {ms[f'loop{e}']:.0f}" for e in experts)
    return {
        "targets": [
            Target(
                f"MoE layer / dense SwiGLU, {big} experts top-{TOP_K}",
                ratio,
                1.3,
                False,
                detail=f"fwd+bwd {tokens} tokens, C={DIM}: MoE {ms[f'moe{big}']:.0f} ms, dense (hidden {TOP_K * INTER}) "
                f"{dense_ms:.0f} ms, per-expert loop {ms[f'loop{big}']:.0f} ms ({ms[f'loop{big}'] / dense_ms:.2f}x)",
            ),
            Target(
                f"MoE time({big} experts) / time({min(experts)})",
                scale,
                1.2,
                False,
                detail=f"ms by experts {sweep}; per-expert loop {loop_sweep} ({loop_scale:.2f}x)",
            ),
        ],
        "figures": {
            "tokens": tokens,
            "dim": DIM,
            "expert_hidden": INTER,
            "top_k": TOP_K,
            "dense_hidden": TOP_K * INTER,
            "repeats": repeats,
            "median_ms": ms,
            "max_over_min": spread(samples),
            "moe_over_dense": {e: ms[f"moe{e}"] / dense_ms for e in experts},
            "loop_over_dense": {e: ms[f"loop{e}"] / dense_ms for e in experts},
            "routing_load": loads,
            "host_syncs_per_fwd_bwd": syncs,
            f"profile_moe{big}": profile,
        },
    }
