"""Training memory against Hugging Face transformers' DeepseekV3ForCausalLM on the same model, weights
and batch (the trainer bench's: bench/trainer_bench.py).

The figure is a step's peak: the most tensor memory allocated at any moment of one training step
(forward, backward, AdamW step, zero_grad) above what is held between steps. Both models hold the
same weights and AdamW state between steps (the detail shows that too), so the peak is activations,
gradients and temporaries. It is read from torch.profiler's allocation events (bench/common.py:
memory_peak), after one warm-up step so the optimizer state already exists: exact bytes from
PyTorch's allocator, not the process's RSS (which malloc's caching and the interpreter blur).

Full activation checkpointing is the trainer's own (`system.distributed.activation_checkpointing:
full`, runtime/models/deepseek_v3/parallelize.py: every block wrapped, routing loads counted once); HF's own
gradient_checkpointing_enable() is shown beside it.
"""

from __future__ import annotations

import torch

from generated.names import ActivationCheckpointing
from runtime.models.deepseek_v3.parallelize import apply_activation_checkpointing

from .common import Target, memory_peak
from .trainer_bench import (
    EXPERTS,
    _hf_step,
    _our_step,
    autocast_bf16,
    bench_models,
    bf16_is_native,
)

STEP_VS_HF, CHECKPOINTED_VS_HF = 0.8, 0.4  # the targets
MB = 2**20


def _held_bytes(module, optimizer_state=True) -> int:
    """Weights (and buffers) plus the AdamW state the step keeps between steps."""
    n = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if optimizer_state:  # exp_avg and exp_avg_sq per parameter, fp32
        n += 2 * sum(p.numel() * p.element_size() for p in module.parameters())
    return n


def saved_for_backward_bytes(module, step) -> int:
    """Bytes of the distinct tensors autograd saves for the backward during one `step()` (the
    activations a step holds at the end of its forward), parameters themselves not counted."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _step_peak(step) -> tuple[int, int]:
    step()  # the optimizer state is created on the first step
    return memory_peak(step)


def run(quick=False):
    batch, seq = (1, 128) if quick else (4, 512)
    n_experts = EXPERTS[0]
    window = torch.randint(0, 256, (batch, seq + 2), generator=torch.Generator().manual_seed(0))
    counter = [0]
    peaks, held, saved = {}, {}, {}

    def measure(name, model, step):
        peaks[name], _ = _step_peak(step)
        held[name] = _held_bytes(model)
        saved[name] = saved_for_backward_bytes(model, step)

    bf16 = bf16_is_native()  # an emulated bf16 step takes minutes: its peak is skipped
    variants = (("", lambda step: step), ("_bf16", autocast_bf16))[: 2 if bf16 else 1]
    for suffix, wrap in variants:
        ours, peer = bench_models(n_experts, seq)
        measure(
            "ours" + suffix,
            ours,
            wrap(_our_step(ours, ours, window[None, :, : seq + 1], counter)),
        )
        measure("hf" + suffix, peer, wrap(_hf_step(peer, window[None], seq)))
        del ours, peer
    ours, peer = bench_models(n_experts, seq)
    apply_activation_checkpointing(ours, ActivationCheckpointing.FULL)
    measure(
        "ours_checkpointed",
        ours,
        _our_step(ours, ours, window[None, :, : seq + 1], counter),
    )
    peer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    measure("hf_checkpointed", peer, _hf_step(peer, window[None], seq))

    mb = {k: v / MB for k, v in peaks.items()}
    bf16_note = (
        f"bf16 autocast: ours {mb['ours_bf16']:.0f} MB, HF {mb['hf_bf16']:.0f} MB "
        f"({peaks['ours_bf16'] / peaks['hf_bf16']:.2f}x)"
        if bf16
        else "bf16 autocast: not measured (no native bf16 matmul on this CPU)"
    )
    ratio = {k: peaks[k] / peaks["hf"] for k in peaks}
    where = f"{n_experts} experts, batch {batch} x {seq}"
    held_mb = held["ours"] / MB
    saved_mb = {k: v / MB for k, v in saved.items()}
    grads_mb = held_mb / 3  # one fp32 gradient per fp32 parameter, as the weights (held: 3x)
    return {
        "targets": [
            Target(
                f"training step peak memory / HF's, {n_experts} experts (fp32)",
                ratio["ours"],
                STEP_VS_HF,
                False,
                detail=f"step peak above weights + AdamW state ({held_mb:.0f} MB, both): ours {mb['ours']:.0f} MB, "
                f"HF {mb['hf']:.0f} MB ({where}); {bf16_note}; why: saved for "
                f"backward ours {saved_mb['ours']:.0f} MB, HF {saved_mb['hf']:.0f} MB, plus {grads_mb:.0f} MB of "
                "gradients in both",
            ),
            Target(
                "training step peak memory / HF's, full activation checkpointing",
                ratio["ours_checkpointed"],
                CHECKPOINTED_VS_HF,
                False,
                detail=f"ours with every block checkpointed {mb['ours_checkpointed']:.0f} MB vs HF plain "
                f"{mb['hf']:.0f} MB; HF checkpointed {mb['hf_checkpointed']:.0f} MB "
                f"({peaks['ours_checkpointed'] / peaks['hf_checkpointed']:.2f}x); activation_checkpointing "
                "full; saved for backward "
                f"{saved_mb['ours_checkpointed']:.0f} MB, the {grads_mb:.0f} MB of gradients stay",
            ),
        ],
        "figures": {
            "experts": n_experts,
            "batch": batch,
            "seq": seq,
            "step_peak_mb": mb,
            "held_between_steps_mb": {k: v / MB for k, v in held.items()},
            "over_hf": ratio,
            "saved_for_backward_mb": saved_mb,
        },
    }
