"""DeepSeek-V3 style Transformer: MLA attention, dense SwiGLU then DeepSeekMoE blocks, and MTP.

Names follow the DeepSeek-V3 reference code (embed, layers.{i}.attn.wq_a/q_norm/wq_b/wkv_a/kv_norm/
wkv_b/wo, ffn.w1/w2/w3, norm, head); runtime/models/deepseek_v3/state_dict_adapter.py maps them to the Hugging Face names. The maths
matches transformers' DeepseekV3ForCausalLM (fp32 logits agree to ~1e-6).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from generated.config import ModelConfig
from generated.names import RopeScaling
from runtime.distributed.utils import local_block
from runtime.models.deepseek_v3.kernels import RMSNormFP32, SwiGLU, causal_attention
from runtime.models.deepseek_v3.moe import Experts, MoE, Router, RoutingKnobs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if (
                not torch.is_grad_enabled()
            ):  # inference: the same passes without autograd's Function
                r = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
                r = r.square_().div_(x.shape[-1]).add_(self.eps).rsqrt_()
                return (x * r).mul_(self.weight)
            return RMSNormFP32.apply(x, self.weight, self.eps)
        # normalise in fp32, scale in the input dtype (as HF does)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(cfg: ModelConfig) -> Tensor:
    """(rope_dim // 2,) YaRN frequencies: interpolated (divided by rope_factor) for dimensions that
    turn fewer than beta_slow times over original_seq_len, kept for those that turn more than
    beta_fast times, a linear ramp between (DeepSeek's and transformers' find_correction_range)."""
    d, base, L = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.original_seq_len

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over L
        return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_of(cfg.beta_fast)), 0)
    high: float = min(math.ceil(dim_of(cfg.beta_slow)), d - 1)
    if low == high:
        high += 0.001  # no singularity
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    return freq / cfg.rope_factor * ramp + freq * (1 - ramp)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """Scale of cos and sin under YaRN (1 otherwise): mscale(mscale) / mscale(mscale_all_dim)."""
    if cfg.rope_scaling != RopeScaling.YARN:
        return 1.0
    f = cfg.rope_factor
    if cfg.mscale and cfg.mscale_all_dim:
        return yarn_mscale(f, cfg.mscale) / yarn_mscale(f, cfg.mscale_all_dim)
    return yarn_mscale(f)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk head dim), times mscale(mscale_all_dim)^2 under YaRN (longer contexts get sharper
    attention, as DeepSeek-V3 was trained)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_scaling == RopeScaling.YARN and cfg.mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
    return scale


def rotary_tables(
    rope_dim: int,
    max_seq_len: int,
    theta: float,
    inv_freq: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """cos, sin (max_seq_len, rope_dim // 2) for rotating consecutive pairs (x0, x1), (x2, x3), ...,
    both times `scale`; inv_freq (rope_dim // 2,) overrides the plain theta frequencies."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos() * scale, angles.sin() * scale


def model_rotary_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """The model's cos, sin: plain, or YaRN's frequencies and cos/sin scale."""
    yarn = cfg.rope_scaling == RopeScaling.YARN
    return rotary_tables(
        cfg.qk_rope_head_dim,
        cfg.max_seq_len,
        cfg.rope_theta,
        inv_freq=yarn_inv_freq(cfg) if yarn else None,
        scale=rope_attention_factor(cfg),
    )


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, H, d) with interleaved pairs -> rotated (B, T, H, d).

    The output lists the rotated even members, then the odd ones. That permutation is the same for
    queries and keys, so q.k is what the interleaved layout gives (HF returns the same layout).
    """
    T = x.shape[1]
    cos = cos[:T, None, :].to(x.dtype)  # (T, 1, d/2)
    sin = sin[:T, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLACache:
    """Generation cache of MLA: per layer, the compressed latent c_kv (after kv_norm) and the
    rotated rope key, (B, T, kv_lora_rank) and (B, T, qk_rope_head_dim); (kv_lora_rank +
    qk_rope_head_dim) numbers per token and layer instead of n_heads * (qk_head_dim + v_head_dim).
    Both live side by side in one (B, capacity, kv_lora_rank + rope) buffer per layer that grows by
    doubling, so a step writes its tokens in place (no copy of the whole cache) and attention reads
    latent and rope key with one matmul. Layers append in order during one forward; `pos` is the
    number of tokens already cached."""

    def __init__(self, n_layers: int):
        self.layers: list[tuple[Tensor, Tensor] | None] = [None] * n_layers  # views of the buffers
        self.buffers: list[Tensor | None] = [None] * n_layers
        self.pos = 0  # advanced by Transformer.forward after all layers ran

    def update(self, layer: int, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's (B, S, r) latent and (B, S, rope) key; returns the whole cache."""
        B, S, r = c_kv.shape
        old, T = (
            self.buffers[layer],
            (
                0
                if self.layers[layer] is None
                else cast(tuple[Tensor, Tensor], self.layers[layer])[0].shape[1]
            ),
        )
        if old is None or old.shape[1] < T + S:
            buf = c_kv.new_empty(B, max(2 * (T + S), 64), r + k_pe.shape[-1])
            if old is not None:
                buf[:, :T] = old[:, :T]
            self.buffers[layer] = old = buf
        old[:, T : T + S, :r] = c_kv
        old[:, T : T + S, r:] = k_pe
        self.layers[layer] = (old[:, : T + S, :r], old[:, : T + S, r:])
        return cast(tuple[Tensor, Tensor], self.layers[layer])  # just set

    def keys(self, layer: int) -> Tensor:
        """(B, T, r + rope): the latent and the rope key of every cached token, side by side."""
        c_kv = cast(tuple[Tensor, Tensor], self.layers[layer])[0]  # update() ran for this layer
        return cast(Tensor, self.buffers[layer])[:, : c_kv.shape[1]]


class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(cfg.dim, self.n_heads * qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * qk_head_dim, bias=False)
        # one projection gives the kv latent and the single rotary key shared by all heads
        self.wkv_a = nn.Linear(cfg.dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(
            self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.wo = nn.Linear(self.n_heads * self.v_dim, cfg.dim, bias=False)
        self.softmax_scale = softmax_scale(cfg)  # qk_head_dim**-0.5, times the yarn mscale^2

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: MLACache | None = None,
        layer: int = 0,
        docs: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, C) -> (B, T, C); `docs` (B, T): each position's document (document_ids),
        attention then stays inside documents."""
        if cache is not None:
            return self._forward_cached(x, cos, sin, cache, layer)
        B, T, _ = x.shape
        H = self.n_heads
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, T, H, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin)  # (B, T, H, rope)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin)  # (B, T, 1, rope)
        kv = self.wkv_b(self.kv_norm(kv)).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        # heads-major copies straight from the cat: (B, H, T, qk)
        q = torch.cat([q_nope.transpose(1, 2), q_pe.transpose(1, 2)], dim=-1)
        k = torch.cat([k_nope.transpose(1, 2), k_pe.transpose(1, 2).expand(-1, H, -1, -1)], dim=-1)
        y = causal_attention(q, k, v.transpose(1, 2), self.softmax_scale, docs)  # (B, H, T, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * self.v_dim))  # (B, T, C)

    def _forward_cached(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: MLACache, layer: int
    ) -> Tensor:
        """x (B, S, C): S new tokens at positions cache.pos .. cache.pos + S - 1 (inference only).

        Attention runs against the cached latent directly ("absorbed" wkv_b, as in DeepSeek's
        reference inference): q_nope goes through wkv_b's key half into the latent space, scores
        are q_lat . c_kv + q_pe . k_pe, and the weighted latent goes through wkv_b's value half. So
        each new token costs O(cached tokens * (kv_lora_rank + rope)) per head: linear in length.
        """
        B, S, _ = x.shape
        H, start = self.n_heads, cache.pos
        cos, sin = cos[start : start + S], sin[start : start + S]
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, S, H, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rotary(q_pe, cos, sin)  # (B, S, H, rope)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rotary(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # (B, S, rope)
        c_kv, _ = cache.update(layer, self.kv_norm(kv), k_pe)  # (B, T, r), (B, T, rope)
        keys = cache.keys(layer)  # (B, T, r + rope)
        T, r = c_kv.shape[1], self.kv_lora_rank
        w = self.wkv_b.weight.view(H, self.nope_dim + self.v_dim, r)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (H, nope, r), (H, v, r)
        q_lat = (q_nope.transpose(1, 2) @ w_uk).transpose(1, 2)  # (B, S, H, r)
        # scores = q_lat . c_kv + q_pe . k_pe, as one matmul against the side-by-side cache
        q = torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1).view(B, S * H, -1)
        scores = torch.bmm(q, keys.transpose(1, 2)).view(B, S, H, T) * self.softmax_scale
        if S > 1:  # new token s sits at position start + s and sees keys 0 .. start + s
            mask = torch.ones(S, T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(c_kv.dtype)
        o = torch.bmm(p.view(B, S * H, T), c_kv).view(B, S, H, r)
        y = (o.transpose(1, 2) @ w_uv.transpose(1, 2)).transpose(1, 2)  # (B, S, H, v)
        return self.wo(y.reshape(B, S, H * self.v_dim))  # (B, S, C)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):  # one dtype inside, forward and backward
            w = (self.w1.weight.to(dt), self.w3.weight.to(dt), self.w2.weight.to(dt))
            return SwiGLU.apply(x.to(dt), *w)


class Block(nn.Module):
    """Pre-norm block; layer_id < first_k_dense gets a dense MLP, the rest (and MTP blocks) MoE."""

    def __init__(self, layer_id: int, model: ModelConfig, knobs: RoutingKnobs):
        super().__init__()
        self.layer_id = layer_id
        self.is_moe = layer_id >= model.first_k_dense
        self.attn_norm = RMSNorm(model.dim, model.norm_eps)
        self.attn = MLA(model)
        self.ffn_norm = RMSNorm(model.dim, model.norm_eps)
        self.ffn: nn.Module
        if not self.is_moe:
            self.ffn = MLP(model.dim, model.inter_dim)
        else:
            shared = None
            if model.n_shared_experts > 0:
                shared = MLP(model.dim, model.n_shared_experts * model.moe_inter_dim)
            self.ffn = MoE(model, knobs, shared)

    recompute = (
        False  # activation checkpointing (runtime/models/deepseek_v3/parallelize.py sets it)
    )

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: MLACache | None = None,
        docs: Tensor | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """x (B, T, C) -> (x, [(aux term, z term)] of its MoE layer; [] for a dense block);
        `docs` (B, T): attention within documents only."""
        attention, feed_forward = self._attention, self._feed_forward
        if self.recompute and torch.is_grad_enabled():
            # each half recomputed on its own (norm included): the backward of one half never
            # holds the other's activations; only the two half inputs (B, T, C) are kept
            attention = functools.partial(checkpoint, attention, use_reentrant=False)
            feed_forward = functools.partial(checkpoint, feed_forward, use_reentrant=False)
        x = x + attention(x, cos, sin, cache, docs)
        if not self.is_moe:
            return x + feed_forward(x), []
        if cache is not None:  # generation: no loss terms
            return x + self.ffn(self.ffn_norm(x), losses=False)[0], []
        y, aux, z = feed_forward(x)
        return x + y, [(aux, z)]

    def _attention(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: MLACache | None, docs: Tensor | None
    ) -> Tensor:
        return self.attn(self.attn_norm(x), cos, sin, cache, self.layer_id, docs)

    def _feed_forward(self, x: Tensor) -> Any:  # a Tensor (MLP), or MoE's (out, aux, z)
        return self.ffn(self.ffn_norm(x))


class MTPModule(nn.Module):
    """Depth-k multi-token prediction: h_k = block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_{k-1})])).

    h_{k-1} is the previous depth's state after its final norm (the main model's `norm` for k = 1,
    as vLLM and SGLang feed DeepSeek-V3's released MTP layer). Embedding and output head are the
    main model's; `norm` is this module's own final norm (DeepSeek's shared_head.norm).
    """

    def __init__(self, layer_id: int, model: ModelConfig, knobs: RoutingKnobs):
        super().__init__()
        self.enorm = RMSNorm(model.dim, model.norm_eps)
        self.hnorm = RMSNorm(model.dim, model.norm_eps)
        self.eh_proj = nn.Linear(2 * model.dim, model.dim, bias=False)
        self.block = Block(layer_id, model, knobs)
        self.norm = RMSNorm(model.dim, model.norm_eps)

    def forward(
        self, h_prev: Tensor, emb: Tensor, cos: Tensor, sin: Tensor, docs: Tensor | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        # h_prev, emb (B, T, C); the embedding half comes first
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin, docs=docs)


def document_ids(tokens: Tensor, eos_id: int) -> Tensor:
    """tokens (B, T) -> (B, T) int64: each position's document within the window, counted from 0
    at the first token; an EOS belongs to the document it ends (exclusive cumulative sum)."""
    ends = (tokens == eos_id).long()
    return ends.cumsum(dim=1) - ends


def _weight_seed(base: int, name: str, expert: int = -1) -> int:
    """A generator seed for one weight (one expert's block of it), the same in every process."""
    return (base * 1_000_003 + zlib.crc32(f"{name}#{expert}".encode())) % 2**63


def _fill_normal(weight: Tensor, std: float, seed: int, per_expert: bool) -> None:
    """Fill this process's block of `weight` with the block of one N(0, std) draw of the whole
    weight; `per_expert`: one draw per expert (dim 0), only for the experts held here."""
    local, shape, offset = local_block(weight)
    if local.numel() == 0:
        return

    def draw(full_shape: tuple[int, ...], draw_seed: int) -> Tensor:
        generator = torch.Generator(device=local.device).manual_seed(draw_seed)
        out = torch.empty(full_shape, device=local.device, dtype=local.dtype)
        return out.normal_(0.0, std, generator=generator)

    if not per_expert:
        block = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        local.copy_(draw(weight.shape, seed)[block])
        return
    block = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:]))
    for i in range(shape[0]):
        local[i].copy_(draw(weight.shape[1:], _weight_seed(seed, "expert", offset[0] + i))[block])


@dataclass
class ModelOutput:
    """What forward computes; weighing it into a loss is runtime/components/loss.py's job."""

    logits: Tensor  # (B, T, vocab) next-token logits
    mtp_logits: list[Tensor]  # per MTP depth k: (B, T, vocab) logits of token t + k + 1
    aux: list[
        Tensor
    ]  # per MoE layer (main blocks, then MTP blocks): sequence-wise balance term (); none with a cache
    z: list[Tensor]  # per MoE layer, same order: router z-loss term (); both empty with a cache


class Transformer(nn.Module):
    """The DeepSeek-V3 network, built from the model section alone; `knobs` are the MoE layers'
    routing settings from the moe section (temperature, noise, capacity, dropping), spec defaults
    when not given (export, sampling and HF parity need no training config)."""

    rope_cos: Tensor  # (max_seq_len, rope_dim // 2) non-persistent buffers
    rope_sin: Tensor

    def __init__(self, model: ModelConfig, knobs: RoutingKnobs | None = None):
        super().__init__()
        knobs = knobs or RoutingKnobs()
        self.config = model
        # one draw of the global RNG; the weights' own generators are seeded from it (init_weights)
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        rng_after_seed = torch.get_rng_state()
        self.embed = nn.Embedding(model.vocab_size, model.dim)
        self.layers = nn.ModuleList([Block(i, model, knobs) for i in range(model.n_layers)])
        self.norm = RMSNorm(model.dim, model.norm_eps)
        self.head = nn.Linear(model.dim, model.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            [MTPModule(model.n_layers + k, model, knobs) for k in range(model.mtp_depth)]
        )
        cos, sin = model_rotary_tables(model)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, module in self.named_modules():
            module._init_name = name  # kept through FSDP2 and checkpoint wrappers (same objects)
        torch.set_rng_state(rng_after_seed)  # construction draws once, built whole or on meta
        if not self.rope_cos.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Set every parameter and buffer to its initial value: N(0, init_std) weights, unit norms,
        zero router biases, the rotary tables. Each weight draws from its own generator, seeded from
        `init_seed` and its name (routed experts: and the expert's index), and each process fills
        only the block it holds: a model built on the meta device and sharded before its weights
        exist (runtime/models/build.py under FSDP2 / expert parallelism) gets the numbers a whole model gets,
        without ever holding more than one weight (one expert's) in full."""
        std, done = self.config.init_std, set()

        def normal(module: nn.Module, attr: str, per_expert: bool = False) -> None:
            weight = getattr(module, attr)
            seed = _weight_seed(self.init_seed, f"{module._init_name}.{attr}")
            _fill_normal(weight, std, seed, per_expert)
            done.add(id(weight))

        for module in self.modules():
            if not hasattr(module, "_init_name"):
                continue  # a wrapper (activation checkpointing) around a module of ours
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                normal(module, "weight")
            elif isinstance(module, Experts):
                normal(module, "w13", per_expert=True)
                normal(module, "w2", per_expert=True)
            elif isinstance(module, RMSNorm):
                local_block(module.weight)[0].fill_(1.0)
                done.add(id(module.weight))
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()
        cos, sin = model_rotary_tables(self.config)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        missed = [n for n, p in self.named_parameters() if id(p) not in done]
        assert not missed, f"init_weights does not set {missed}"

    def num_params(self) -> int:
        """All parameters (embedding and head are untied, both counted; MTP modules included)."""
        return sum(p.numel() for p in self.parameters())

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(layer index, MoE) of the main blocks, then the MTP blocks (index n_layers + k - 1)."""
        # a pipeline stage's process holds only some of them (the others are pipeline.Absent)
        blocks = [b for b in self.layers if isinstance(b, Block)] + [
            m.block for m in self.mtp if isinstance(m, MTPModule)
        ]
        return [(b.layer_id, b.ffn) for b in blocks if isinstance(b.ffn, MoE)]

    def forward(
        self,
        tokens: Tensor,
        cache: MLACache | None = None,
        mtp: bool = False,
        eos_id: int | None = None,
    ) -> ModelOutput:
        """tokens (B, T) int64 -> ModelOutput with logits (B, T, vocab).

        mtp=True (training and evaluation): tokens is (B, T + mtp_depth); the main model reads the
        first T and MTP depth k embeds tokens[:, k : T + k], so logits[:, t] and mtp_logits[k-1][:, t]
        predict tokens t + 1 and t + k + 1 of the full sequence. With `cache` (from new_cache(),
        inference only), tokens are the next ones after those already cached; no MTP.

        `eos_id` (document masking): attention does not cross the end of a document; each token
        attends only to earlier tokens of its own document (the EOS belongs to the document it
        ends). Positions are not restarted: rotary attention depends on relative positions only,
        so a document's logits are the same wherever it starts in the window. The MTP modules mask
        by the same documents: position t combines the state of token t with the embedding of
        token t + k, and attends to the positions of token t's document only.
        """
        D = self.config.mtp_depth if mtp else 0
        T = tokens.shape[1] - D
        if T < 1:
            raise ValueError(f"{tokens.shape[1]} tokens are too few for mtp_depth={D}")
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_seq_len:
            what = "cache" if cache is not None else "sequence"
            raise ValueError(
                f"{what} of {start + T} tokens is longer than max_seq_len={self.config.max_seq_len}"
            )
        terms: list[tuple[Tensor, Tensor]] = []
        docs = document_ids(tokens, eos_id) if eos_id is not None and cache is None else None
        h = self.embed(tokens[:, :T])  # (B, T, C)
        for layer in self.layers:
            h, t = layer(
                h, self.rope_cos, self.rope_sin, cache, None if docs is None else docs[:, :T]
            )
            terms += t
        if cache is not None:
            cache.pos = start + T
        h = self.norm(h)  # (B, T, C)
        logits = self.head(h)
        mtp_logits = []
        for k, module in enumerate(cast(Iterable[MTPModule], self.mtp[:D]), start=1):
            # each depth reads the previous one's normed state (what its head reads)
            mtp_docs = None if docs is None else docs[:, :T]
            h, t = module(
                h, self.embed(tokens[:, k : T + k]), self.rope_cos, self.rope_sin, mtp_docs
            )
            terms += t
            h = module.norm(h)
            mtp_logits.append(self.head(h))
        return ModelOutput(logits, mtp_logits, [a for a, _ in terms], [z for _, z in terms])

    def new_cache(self) -> MLACache:
        return MLACache(self.config.n_layers)
