"""Training-step throughput against Hugging Face transformers' DeepseekV3ForCausalLM, and MFU.

A full step is forward, backward, AdamW step, zero_grad (and, for ours, the router-bias update).
Our model and the peer are the same architecture, built from one ModelConfig (the peer through
runtime/models/deepseek_v3/state_dict_adapter.py's config mapping, `DeepseekV3ForCausalLM(DeepseekV3Config(**hf_config(cfg)))`) and
given our initial weights, so both route alike; the bench checks their logits agree. Both see the
same batches, a new one each step as in training (cycling through BATCHES, so the experts' row counts
change from step to step), in fp32, with the same thread count and the same optimizer (torch AdamW,
fused CPU kernel, for every model); all run round-robin with a large fp32 matmul that measures the
machine's peak in the same run. The peer runs
with its defaults (SDPA attention, grouped_mm experts); it trains without MTP, so our MTP-off step
is the one compared and the MTP-on step is shown beside it, as is our torch.compile'd step.

bf16 is what users train in: both steps again under `torch.autocast(bfloat16)` (fp32 weights and
optimizer, as autocast training is), beside a bf16 matmul of the same size for the bf16 peak.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from generated.config import ModelConfig, MoETrainingConfig, MTPTrainingConfig
from runtime.components.balancer import MoEBalancer
from runtime.components.loss import TrainingLoss
from runtime.distributed.precision import cpu_native_matmul
from runtime.models.deepseek_v3.model import MLA, Transformer
from runtime.models.deepseek_v3.moe import MoE
from runtime.models.deepseek_v3.state_dict_adapter import BLOCK_KEYS, TOP_KEYS, hf_config

from .common import Target, interleaved_medians, median_time, profile_summary, spread

BENCH_MODEL = dict(
    vocab_size=256,
    dim=512,
    inter_dim=1536,
    moe_inter_dim=256,
    n_layers=3,  # one dense block, two MoE blocks
    first_k_dense=1,
    n_heads=8,
    q_lora_rank=0,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_shared_experts=1,
    top_k=2,
)
EXPERTS = (16, 64)
BATCHES = 8  # distinct batches the steps cycle through
PEAK_N = 2048  # the peak: one (PEAK_N x PEAK_N) @ (PEAK_N x PEAK_N) matmul, fp32 and bf16
FP32_VS_HF, BF16_VS_HF, MFU_FP32, MFU_BF16 = 1.15, 1.5, 0.6, 0.55  # the targets


def model_flops(model: Transformer, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward) on batch x seq tokens.

    6 * (active matmul parameters) * tokens + attention. Active parameters are the weights a token
    multiplies by: every Linear (attention projections, dense and shared-expert SwiGLUs, MTP
    eh_proj), each MoE router, top_k of the n_routed_experts routed experts (w13, w2), and the
    output head once per prediction (main, plus once per MTP depth). The embedding (a lookup) and
    the norms are not counted. Attention adds, per attention layer (main blocks and MTP blocks),
    2 FLOPs per multiply-add of q.k and p.v over the causal pairs only (T(T+1)/2 per head and
    sequence), forward, times 3 for forward + backward: 3 * 2 * B * H * T(T+1)/2 * (d_qk + d_v).
    Recomputation, padding, masked-out scores and the optimizer are not counted.
    """
    cfg = model.config
    active = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not model.head:
            active += module.weight.numel()
        elif isinstance(module, MoE):
            active += module.gate.weight.numel()
            active += (
                (module.experts.w13.numel() + module.experts.w2.numel())
                * cfg.top_k
                // cfg.n_routed_experts
            )
    active += model.head.weight.numel() * (1 + cfg.mtp_depth)
    tokens = batch * seq
    n_attn = sum(isinstance(m, MLA) for m in model.modules())
    d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    attention = n_attn * 3 * 2 * batch * cfg.n_heads * seq * (seq + 1) / 2 * (d_qk + d_v)
    return 6.0 * active * tokens + attention


def _hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our (MTP-off) weights under transformers' in-memory names (experts fused as ours are)."""
    out = {}
    for name, t in model.state_dict().items():
        if name in TOP_KEYS:
            out[TOP_KEYS[name]] = t
            continue
        _, i, key = name.split(".", 2)
        prefix = f"model.layers.{i}."
        if key == "ffn.experts.w13":
            out[prefix + "mlp.experts.gate_up_proj"] = t
        elif key == "ffn.experts.w2":
            out[prefix + "mlp.experts.down_proj"] = t
        else:
            out[prefix + BLOCK_KEYS[key]] = t
    return out


def _hf_peer(model: Transformer):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = hf_config(model.config)
    config["use_cache"] = False  # training
    peer = DeepseekV3ForCausalLM(DeepseekV3Config(**config))
    missing, unexpected = peer.load_state_dict(_hf_state_dict(model), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return peer.train()


def _optimizer(module):
    return torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.1, fused=True)


def _our_step(model, forward, windows, counter):
    """One trainer step of `model` (`forward`: the model or a compiled wrapper of it) on the next of
    `windows` (n, B, T + 1 + mtp_depth), in turn."""
    opt = _optimizer(model)
    loss = TrainingLoss(MoETrainingConfig(), MTPTrainingConfig())
    balancer = MoEBalancer(model, MoETrainingConfig())
    calls = [0]

    def step():
        window = windows[calls[0] % len(windows)]
        calls[0] += 1
        out = loss(forward, window, counter[0])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        balancer.update()
        counter[0] += 1

    return step


def _hf_step(peer, windows, seq):
    opt = _optimizer(peer)
    calls = [0]

    def step():
        window = windows[calls[0] % len(windows)]
        calls[0] += 1
        inputs, targets = window[:, :seq], window[:, 1 : seq + 1]
        logits = peer(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def autocast_bf16(step):
    """`step` run under CPU (or CUDA) bf16 autocast."""

    def run():
        with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16):
            step()

    return run


def bf16_is_native() -> bool:
    """Whether bf16 matmuls run natively here (CUDA, or a CPU with AVX512 / AMX bf16 support)."""
    return torch.cuda.is_available() or cpu_native_matmul(torch.bfloat16)


def emulated_bf16_peak(n: int = 256) -> float:
    """FLOP/s of an n^3 bf16 matmul: on a CPU without native bf16 the 2048^3 one takes a minute
    (0.27 GFLOP/s on a 2-core AVX2 EPYC against about 1.3 at 256^3); a rough guide only: there the
    estimate said 76 s for the bench model's bf16 step at 64 experts, which measured 35 s."""
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    return 2 * n**3 / median_time(lambda: a @ b, repeats=3)


def bench_models(n_experts: int, seq: int, mtp_depth: int = 0):
    """(ours, its HF peer with our weights) for the bench model with `n_experts` routed experts."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        **BENCH_MODEL, n_routed_experts=n_experts, max_seq_len=seq + 1, mtp_depth=mtp_depth
    )
    ours = Transformer(cfg).train()
    return ours, _hf_peer(ours)


def _dynamo_stats(since=None):
    """torch._dynamo's counters (graphs compiled, ops captured, graph breaks), minus `since`."""
    from torch._dynamo.utils import counters

    now = {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "calls_captured": counters["stats"]["calls_captured"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }
    return {k: v - (since or {}).get(k, 0) for k, v in now.items()}


def _suite(n_experts, batch, seq, repeats, compile_step, profile):
    ours, peer = bench_models(n_experts, seq)
    cfg = ours.config
    torch.manual_seed(0)
    cfg_mtp = ModelConfig(
        **BENCH_MODEL, n_routed_experts=n_experts, max_seq_len=seq + 1, mtp_depth=1
    )
    ours_mtp = Transformer(cfg_mtp).train()
    # a new batch every step, as in training: each expert's row count changes from step to step
    windows = torch.randint(
        0,
        cfg.vocab_size,
        (BATCHES, batch, seq + 2),
        generator=torch.Generator().manual_seed(0),
    )
    window = windows[0]
    with torch.no_grad():  # the peer computes what we compute
        logits_diff = (
            (ours(window[:, :seq]).logits - peer(input_ids=window[:, :seq]).logits)
            .abs()
            .max()
            .item()
        )

    counter = [0]
    steps = {
        "ours": _our_step(ours, ours, windows[..., : seq + 1], counter),
        "ours_mtp": _our_step(ours_mtp, ours_mtp, windows, counter),
        "hf": _hf_step(peer, windows, seq),
    }
    # bf16 autocast steps on their own copies (their optimizers keep their own state); not on a
    # CPU that emulates bf16 matmuls (one step would take minutes: run() reports the measured why)
    bf16 = bf16_is_native()
    if bf16:
        ours_bf16 = Transformer(cfg).train()
        ours_bf16.load_state_dict(ours.state_dict())
        steps["ours_bf16"] = autocast_bf16(
            _our_step(ours_bf16, ours_bf16, windows[..., : seq + 1], counter)
        )
        steps["hf_bf16"] = autocast_bf16(_hf_step(_hf_peer(ours_bf16), windows, seq))
    compile_info = None
    if compile_step:
        torch._dynamo.reset()
        ours_c = Transformer(cfg).train()
        ours_c.load_state_dict(ours.state_dict())
        compiled = _our_step(ours_c, torch.compile(ours_c), windows[..., : seq + 1], counter)
        before = _dynamo_stats()
        start = time.perf_counter()
        compiled()  # compiles
        first = time.perf_counter() - start
        for _ in range(2):  # the step number changes: one recompile with it dynamic, then stable
            compiled()
        steps["compiled"] = compiled
        compile_info = {"first_step_s": first, "after_warmup": _dynamo_stats(before)}

    a = torch.randn(PEAK_N, PEAK_N)
    b = torch.randn(PEAK_N, PEAK_N)
    a16, b16 = a.bfloat16(), b.bfloat16()
    # what a bf16 step pays for its routed experts' fp32 weights: each cast to bf16 in the forward
    # and each bf16 weight gradient cast back to fp32 (HF's experts skip both: autocast leaves
    # torch._grouped_mm alone, so they run in fp32)
    expert_weights = [p for n, p in ours.named_parameters() if ".experts." in n]
    expert_grads = [p.detach().bfloat16() for p in expert_weights]

    def expert_casts():
        for w, g in zip(expert_weights, expert_grads):
            w.detach().bfloat16()
            g.float()

    samples = {}
    bf16_only = {"peak_matmul_bf16": lambda: a16 @ b16, "expert_casts": expert_casts}
    times = interleaved_medians(
        {"peak_matmul": lambda: a @ b, **(bf16_only if bf16 else {}), **steps},
        repeats,
        warmup=1,
        samples=samples,
    )
    expert_casts_ms = times.pop("expert_casts") * 1e3 if bf16 else None
    if compile_info is not None:
        compile_info["after_timing"] = _dynamo_stats(before)
        compile_info["recompiles_during_timing"] = (
            compile_info["after_timing"]["unique_graphs"]
            - compile_info["after_warmup"]["unique_graphs"]
        )
    peak = 2 * PEAK_N**3 / times.pop("peak_matmul")
    peak_bf16 = 2 * PEAK_N**3 / times.pop("peak_matmul_bf16") if bf16 else emulated_bf16_peak()
    tokens = batch * seq
    flops = {"ours": model_flops(ours, batch, seq), "ours_mtp": model_flops(ours_mtp, batch, seq)}
    for k in ("hf", "compiled", "ours_bf16", "hf_bf16"):
        flops[k] = flops["ours"]
    peaks = {k: peak_bf16 if k.endswith("_bf16") else peak for k in times}
    result = {
        "batch": batch,
        "seq": seq,
        "params": {
            "ours": ours.num_params(),
            "ours_mtp": ours_mtp.num_params(),
            "hf": sum(p.numel() for p in peer.parameters()),
        },
        "hf_implementation": {
            "attention": peer.config._attn_implementation,
            "experts": peer.config._experts_implementation,
        },
        "logits_max_abs_diff_vs_hf": logits_diff,
        "peak_gflops": peak / 1e9,
        "peak_gflops_bf16": peak_bf16 / 1e9,
        "bf16_native": bf16,
        "model_gflops_per_step": {k: flops[k] / 1e9 for k in times},
        "step_ms": {k: v * 1e3 for k, v in times.items()},
        "max_over_min": spread(samples),
        "tokens_per_s": {k: tokens / v for k, v in times.items()},
        "mfu": {k: flops[k] / times[k] / peaks[k] for k in times},
        "compile": compile_info,
        "expert_weight_casts_ms": expert_casts_ms,
    }
    if profile:
        profiled = ("ours", "hf", "ours_bf16", "hf_bf16") if bf16 else ("ours", "hf")
        prof = {k: profile_summary(steps[k]) for k in profiled}
        for dtype in ("", "_bf16") if bf16 else ("",):
            ours_prof = prof["ours" + dtype]
            gemm_ms = ours_prof["gemm_share"] * ours_prof["profiled_ms_per_call"]
            # were all our non-matmul time gone, the step would still take our matmul time
            prof[f"hf{dtype}_step_over_our_matmul_time"] = times["hf" + dtype] * 1e3 / gemm_ms
        for k in profiled:
            # the routed experts' grouped matmuls (the same torch._grouped_mm kernel in both models),
            # as a share of the timed step; the rest is where the two implementations differ
            experts = prof[k]["inclusive_share"]["aten::_grouped_mm"] * times[k] * 1e3
            prof[k]["expert_gemm_ms"] = experts
            prof[k]["rest_ms"] = times[k] * 1e3 - experts
        result["profile"] = prof
    return result


def expert_reason(s, dtype=""):
    """The measured split of both steps into routed-expert GEMMs and the rest, or "" unprofiled."""
    if "profile" not in s:
        return ""
    ours, hf = s["profile"]["ours" + dtype], s["profile"]["hf" + dtype]
    return (
        f"; why: routed-expert GEMMs (torch._grouped_mm, same kernel in both) ours {ours['expert_gemm_ms']:.0f} ms, "
        f"HF {hf['expert_gemm_ms']:.0f} ms; the rest ours {ours['rest_ms']:.0f} ms, HF {hf['rest_ms']:.0f} ms "
        f"({hf['rest_ms'] / ours['rest_ms']:.2f}x)"
    )


def _unmeasured_bf16(name, s, bound, unit="x"):
    """A bf16 target on a CPU that emulates bf16 matmuls: no figure (NaN, does not hold), and why."""
    gflop = s["model_gflops_per_step"]["ours"]
    return Target(
        name,
        float("nan"),
        bound,
        True,
        unit=unit,
        detail=f"not measured: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 "
        f"matmul; a bf16 matmul runs at {s['peak_gflops_bf16']:.2f} GFLOP/s here against "
        f"{s['peak_gflops']:.0f} for fp32 ({s['peak_gflops'] / s['peak_gflops_bf16']:.0f}x), so one "
        f"bf16 step ({gflop:.0f} GFLOP) would take about {gflop / s['peak_gflops_bf16']:.0f} s "
        f"against {s['step_ms']['ours']:.0f} ms in fp32",
    )


def run(quick=False):
    batch, seq = (2, 256) if quick else (4, 512)
    repeats = 2 if quick else 8
    suites = {
        e: _suite(e, batch, seq, repeats, compile_step=not quick, profile=not quick)
        for e in EXPERTS
    }
    targets = []
    for e, s in suites.items():
        tps, mfu = s["tokens_per_s"], s["mfu"]
        extra = ""
        if "compiled" in tps:
            c = s["compile"]
            extra = (
                f", compiled {tps['compiled']:.0f} (MFU {mfu['compiled']:.0%}, {c['after_timing']['unique_graphs']} graphs, "
                f"{c['recompiles_during_timing']} recompiles while timed)"
            )
        targets.append(
            Target(
                f"trainer step tokens/s vs HF, {e} experts (fp32, eager, MTP off)",
                tps["ours"] / tps["hf"],
                FP32_VS_HF,
                True,
                detail=f"tok/s ours {tps['ours']:.0f} (MFU {mfu['ours']:.0%}), HF {tps['hf']:.0f} (MFU {mfu['hf']:.0%}), "
                f"ours MTP on {tps['ours_mtp']:.0f} (MFU {mfu['ours_mtp']:.0%}){extra}{expert_reason(s)}",
            )
        )
    for e, s in suites.items():
        if not s["bf16_native"]:
            targets.append(
                _unmeasured_bf16(
                    f"trainer step tokens/s vs HF, {e} experts (bf16 autocast)", s, BF16_VS_HF
                )
            )
            continue
        tps, mfu = s["tokens_per_s"], s["mfu"]
        why = expert_reason(s, "_bf16") + (
            f"; our rest includes {s['expert_weight_casts_ms']:.0f} ms of casting the fp32 expert "
            "weights to bf16 and their gradients back (HF runs its experts in fp32)"
        )
        if "profile" in s:  # were all our non-matmul time gone, we would still take our matmul time
            over = s["profile"]["hf_bf16_step_over_our_matmul_time"]
            why += f"; HF's step takes {over:.2f}x our matmul time alone"
        targets.append(
            Target(
                f"trainer step tokens/s vs HF, {e} experts (bf16 autocast)",
                tps["ours_bf16"] / tps["hf_bf16"],
                BF16_VS_HF,
                True,
                detail=f"tok/s ours {tps['ours_bf16']:.0f} (MFU {mfu['ours_bf16']:.0%}, {tps['ours_bf16'] / tps['ours']:.2f}x our fp32), "
                f"HF {tps['hf_bf16']:.0f} (MFU {mfu['hf_bf16']:.0%}; {BF16_VS_HF}x needs our MFU >= {BF16_VS_HF * mfu['hf_bf16']:.0%}){why}",
            )
        )
    s = suites[EXPERTS[0]]
    targets.append(
        Target(
            f"MFU fp32, {EXPERTS[0]} experts (our eager step, MTP off)",
            s["mfu"]["ours"],
            MFU_FP32,
            True,
            unit="fraction",
            detail=f"{s['model_gflops_per_step']['ours']:.1f} GFLOP/step, {s['step_ms']['ours']:.0f} ms, peak "
            f"{s['peak_gflops']:.0f} GFLOP/s ({PEAK_N}^3 fp32 matmul, same run)",
        )
    )
    if not s["bf16_native"]:
        targets.append(
            _unmeasured_bf16(
                f"MFU bf16, {EXPERTS[0]} experts (our autocast step, MTP off)",
                s,
                MFU_BF16,
                "fraction",
            )
        )
        return {"targets": targets, "figures": {"model": BENCH_MODEL, "by_experts": suites}}
    why = ""
    if "profile" in s:
        p = s["profile"]["ours_bf16"]
        top = ", ".join(
            f"{k.removeprefix('aten::')} {v:.0f}" for k, v in list(p["top_ops_self_ms"].items())[:5]
        )
        why = f"; profile: matmul {p['gemm_share']:.0%} of {p['profiled_ms_per_call']:.0f} ms, top ops ms {top}"
    targets.append(
        Target(
            f"MFU bf16, {EXPERTS[0]} experts (our autocast step, MTP off)",
            s["mfu"]["ours_bf16"],
            MFU_BF16,
            True,
            unit="fraction",
            detail=f"{s['step_ms']['ours_bf16']:.0f} ms, peak {s['peak_gflops_bf16']:.0f} GFLOP/s "
            f"({PEAK_N}^3 bf16 matmul, same run; fp32 {s['peak_gflops']:.0f}){why}",
        )
    )
    return {"targets": targets, "figures": {"model": BENCH_MODEL, "by_experts": suites}}
