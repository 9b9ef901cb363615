"""The DeepSeek-V3 model's kernels: autograd functions and custom ops with hand-written backwards.

Each computes exactly what its plain PyTorch composite would, with fewer passes or less memory kept
for the backward (measured on CPU; the docstrings give the figures):

  RMSNormFP32            fp32 RMSNorm, 3 passes forward and 7 backward
  causal_attention       MLA's causal attention in query blocks on CPU (SDPA elsewhere)
  SwiGLU                 the dense MLP, keeping only its inputs and the two projections
  grouped_swiglu         all routed experts as two grouped matmuls (torch._grouped_mm), a custom op
  run_experts            grouped_swiglu, or a padded bmm where the grouped kernel is unavailable
  Dispatch, Combine      dropless token dispatch to and combine from the experts
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class RMSNormFP32(torch.autograd.Function):
    """fp32 RMSNorm with a hand-written backward: 3 passes over x forward, 7 backward (autograd's
    composite takes about 4 and 10); ~35% faster on CPU, same maths."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        r = r.square_().div_(x.shape[-1]).add_(eps).rsqrt_()  # 1 / rms, (..., 1)
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, r = ctx.saved_tensors
        xhat = x * r
        g_w = (g * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        g_x = None
        if ctx.needs_input_grad[0]:
            g_xhat = g * weight
            dot = torch.linalg.vecdot(g_xhat, xhat).unsqueeze(-1).div_(x.shape[-1])
            g_x = torch.addcmul(g_xhat, xhat, dot, value=-1).mul_(r)
        return g_x, g_w, None


ATTN_BLOCK = 128  # query rows per block of the CPU causal attention


def _attention_blocks(T: int) -> list[tuple[int, int]]:
    n = max(1, T // ATTN_BLOCK)
    bounds = [T * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class BlockedCausalAttention(torch.autograd.Function):
    """q, k (BH, T, dk), v (BH, T, dv) -> (BH, T, dv), causal; query rows in blocks, each against only
    the keys up to its last row. Keeps each block's probabilities for the backward (what autograd
    keeps too) and accumulates the key and value gradients in place, block by block, where
    autograd would add full-size (BH, T, d) zero-padded gradients per block."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        BH, T, _ = q.shape
        mask = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu_(1)
        out = q.new_empty(BH, T, v.shape[-1])
        probs = []
        for r0, r1 in _attention_blocks(T):
            # the mask is added inside the matmul; rows r0..r1 see keys 0..r1
            s = torch.baddbmm(mask[r0:r1, :r1], q[:, r0:r1], k[:, :r1].transpose(1, 2), alpha=scale)
            p = torch.softmax(s, dim=-1)  # (BH, r1 - r0, r1)
            out[:, r0:r1].baddbmm_(p, v[:, :r1], beta=0)
            probs.append(p)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, *probs)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, *probs = ctx.saved_tensors
        g = g.contiguous()
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for (r0, r1), p in zip(_attention_blocks(q.shape[1]), probs):
            g_block = g[:, r0:r1]  # (BH, n, dv)
            dv[:, :r1].baddbmm_(p.transpose(1, 2), g_block)
            dp = torch.bmm(g_block, v[:, :r1].transpose(1, 2))  # (BH, n, r1)
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dq[:, r0:r1].baddbmm_(ds, k[:, :r1], beta=0, alpha=ctx.scale)
            dk[:, :r1].baddbmm_(ds.transpose(1, 2), q[:, r0:r1], alpha=ctx.scale)
        return dq, dk, dv, None


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, docs: Tensor | None = None
) -> Tensor:
    """Causal softmax attention: q, k (B, H, T, dk), v (B, H, T, dv) -> (B, H, T, dv); with
    `docs` (B, T) document ids, a query attends only to keys of its own document (block-diagonal
    causal: the mask F.scaled_dot_product_attention takes).

    Off CPU, and with documents, this is F.scaled_dot_product_attention. On CPU, SDPA's flash
    kernel needs dk == dv (not so in MLA), so it takes the math path: full T x T scores plus mask
    passes. Without documents, query rows go in blocks of ATTN_BLOCK (BlockedCausalAttention), so
    the fully masked upper-right blocks are never computed (5/8 of the score FLOPs at 4 blocks).
    Same maths; the blocks are a static loop.
    """
    if docs is not None:
        T = q.shape[2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = (docs[:, :, None] == docs[:, None, :]) & causal  # (B, T, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    B, H, T, _ = q.shape
    dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    qf, kf, vf = (t.reshape(B * H, T, t.shape[-1]).to(dt) for t in (q, k, v))
    with torch.autocast("cpu", enabled=False):  # one dtype inside, forward and backward
        return BlockedCausalAttention.apply(qf, kf, vf, scale).view(B, H, T, -1)


class SwiGLU(torch.autograd.Function):
    """w2(silu(w1 x) * w3 x) keeping only x, w1 x and w3 x for the backward: silu(w1 x) and the
    product are recomputed there (two elementwise passes) instead of held from the forward to the
    backward, 2 of autograd's 4 (tokens, hidden) tensors per MLP. Same maths; all in one dtype."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
        a, b = F.linear(x, w1), F.linear(x, w3)
        ctx.save_for_backward(x, w1, w3, w2, a, b)
        return F.linear(F.silu(a).mul_(b), w2)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, w1, w3, w2, a, b = ctx.saved_tensors
        s = F.silu(a)
        g2 = g.flatten(0, -2)
        g_w2 = g2.t() @ (s * b).flatten(0, -2)  # (dim, hidden)
        g_p = g @ w2  # (..., hidden)
        g_b = g_p * s
        del s  # (tokens, hidden) each: free before the next one is allocated
        g_a = torch.ops.aten.silu_backward(g_p.mul_(b), a).flatten(0, -2)
        g_b = g_b.flatten(0, -2)
        g_x = torch.addmm(g_a @ w1, g_b, w3).view(x.shape)  # no separate sum of the two
        x2 = x.flatten(0, -2)
        return g_x, g_a.t() @ x2, g_b.t() @ x2, g_w2


def compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


@functools.cache
def _grouped_mm_works(device: str, dtype: torch.dtype) -> bool:
    """Probe once per device and dtype: does torch._grouped_mm run forward and backward, and agree
    with plain matmuls? (CPU takes every float dtype; CUDA kernels may want bf16 and sm80+.)
    Deterministic inputs: the probe must not consume the seeded RNG."""
    dev = torch.device(device)

    def make(*shape: int) -> Tensor:
        n = math.prod(shape)
        t = torch.arange(n, device=dev, dtype=torch.float32).mul(0.37).sin().view(*shape)
        return t.to(dtype)

    try:
        # own (identity) saved-tensor hooks: a probe first reached inside activation checkpointing
        # must not add its tensors to the checkpointed region's (the recomputation would not)
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(dev.type, enabled=False),
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
        ):
            x = make(10, 16).requires_grad_(True)
            w = make(3, 32, 16).requires_grad_(True)
            offs = torch.tensor([4, 4, 10], dtype=torch.int32, device=dev)  # with an empty group
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            ref = torch.cat([x[:4] @ w[0].T, x[4:] @ w[2].T])
            g = make(10, 32)
            got = (y, *torch.autograd.grad(y, (x, w), g))
            want = (ref, *torch.autograd.grad(ref, (x, w), g))
            return all(
                torch.allclose(a.float(), b.float(), rtol=5e-2, atol=5e-2)
                for a, b in zip(got, want)
            )
    except Exception:  # unsupported device, dtype or architecture
        return False


@torch.compiler.assume_constant_result
def _grouped_mm_probe(device: str, dtype: torch.dtype) -> bool:
    # under torch.compile the probe runs once at trace time and its answer is a constant of the graph
    return _grouped_mm_works(device, dtype)


def grouped_mm_ok(x: Tensor, *weights: Tensor) -> bool:
    """Whether to use torch._grouped_mm: it wants 16-byte aligned rows, and a one-off probe per device
    and dtype decides whether it runs there. (It runs inside the opaque custom ops below, so under
    torch.compile too, whatever dtype its meta function would accept.)"""
    if not hasattr(torch, "_grouped_mm"):
        return False
    align = 16 // x.element_size()
    if any(w.shape[-1] % align or w.shape[-2] % align for w in weights):
        return False
    return _grouped_mm_probe(str(x.device), x.dtype)


# ----------------------------------------------------------------------------- grouped SwiGLU
# All experts' SwiGLU as two grouped matmuls, with a hand-written backward. Custom ops, so that
# torch.compile treats them as opaque kernels (no recompiles on the token counts, no meta-function
# dtype limits) and the eager step runs no autograd glue between the matmuls. The routing weight of
# each row scales the activation before the down projection (w2 is linear, so this equals scaling
# the expert output, on I instead of C columns). Weight gradients come out in the parameters' own
# layout, so AccumulateGrad keeps them without a copy.


@torch.library.custom_op("deepseek_moe::grouped_swiglu", mutates_args=())
def grouped_swiglu(
    xs: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, rw: Tensor
) -> tuple[Tensor, Tensor]:
    """xs (M, C) sorted by expert, w13 (E, 2I, C), w2 (E, C, I), offs (E,) int32 row ends, rw (M,)
    -> y (M, C), and for the backward h = xs w13^T (M, 2I). Only h is kept: the backward recomputes
    silu(gate) * up from it (two elementwise passes) rather than holding 3 more (M, I) tensors per
    layer until the backward (12 MB a layer at 8192 rows and I = 256, fp32)."""
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
    g, u = h.chunk(2, dim=-1)
    a = F.silu(g).mul_(u).mul_(rw.unsqueeze(1))
    return torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs), h


@grouped_swiglu.register_fake
def _(xs: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, rw: Tensor) -> tuple[Tensor, Tensor]:
    M, I = xs.shape[0], w2.shape[2]
    return xs.new_empty(M, w2.shape[1]), xs.new_empty(M, 2 * I)


@torch.library.custom_op("deepseek_moe::grouped_swiglu_backward", mutates_args=())
def _grouped_swiglu_backward(
    gy: Tensor,
    xs: Tensor,
    w13: Tensor,
    w2: Tensor,
    offs: Tensor,
    rw: Tensor,
    h: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> grads of xs (M, C), w13 (E, 2I, C), w2 (E, C, I), rw (M,)."""
    gy = gy.contiguous()
    I = w2.shape[-1]
    s = F.silu(h[:, :I])  # recomputed from h: s = silu(gate), su = s * up, a = su * rw
    su = s * h[:, I:]
    a = su * rw.unsqueeze(1)
    g_a = torch._grouped_mm(gy, w2, offs=offs)  # (M, I)
    g_w2 = torch._grouped_mm(gy.t(), a, offs=offs)  # (E, C, I); empty groups get zeros
    g_rw = torch.linalg.vecdot(g_a, su)  # (M,)
    g_a.mul_(rw.unsqueeze(1))  # now the grad of su
    g_h = torch.empty_like(h)
    torch.mul(g_a, s, out=g_h[:, I:])  # up
    g_h[:, :I] = torch.ops.aten.silu_backward(g_a.mul_(h[:, I:]), h[:, :I])  # gate
    g_xs = torch._grouped_mm(g_h, w13, offs=offs)  # (M, C)
    g_w13 = torch._grouped_mm(g_h.t(), xs, offs=offs)  # (E, 2I, C)
    return g_xs, g_w13, g_w2, g_rw


@_grouped_swiglu_backward.register_fake
def _(
    gy: Tensor, xs: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, rw: Tensor, h: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        xs.new_empty(xs.shape),
        w13.new_empty(w13.shape),
        w2.new_empty(w2.shape),
        rw.new_empty(rw.shape),
    )


def _grouped_swiglu_setup(
    ctx: Any, inputs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], output: tuple[Tensor, Tensor]
) -> None:
    xs, w13, w2, offs, rw = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(xs, w13, w2, offs, rw, h)


def _grouped_swiglu_grad(
    ctx: Any, gy: Tensor, *_: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, None, Tensor]:
    g_xs, g_w13, g_w2, g_rw = _grouped_swiglu_backward(gy, *ctx.saved_tensors)
    return g_xs, g_w13, g_w2, None, g_rw


grouped_swiglu.register_autograd(_grouped_swiglu_grad, setup_context=_grouped_swiglu_setup)


class Dispatch(torch.autograd.Function):
    """Dropless dispatch: xs = x[tok], each token's K copies in expert order (tok = order // K).
    The backward gathers the copies back with the inverse permutation and sums them (no scatter)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, tok: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, tok)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        (inv,) = ctx.saved_tensors
        return _unpermute_sum(g, inv, ctx.k), None, None, None


class Combine(torch.autograd.Function):
    """Dropless combine, the adjoint of Dispatch: out[n] = sum over its K rows of ys (fp32)."""

    @staticmethod
    def forward(ctx: Any, ys: Tensor, tok: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(tok)
        ctx.dtype = ys.dtype
        # summed in ys's dtype (K terms each), then widened: N rows to cast instead of N*K
        return _unpermute_sum(ys, inv, k).float()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        (tok,) = ctx.saved_tensors
        return g.index_select(0, tok).to(ctx.dtype), None, None, None


def _unpermute_sum(ys: Tensor, inv: Tensor, k: int) -> Tensor:
    # ys (N*K, C) in expert order -> (N, C): row n sums ys[inv[n*K : n*K + K]]. embedding_bag does
    # the gather and the sum in one pass (2-3x faster on CPU than index_select + sum)
    return F.embedding_bag(inv.view(-1, k), ys, mode="sum")


# CPU bf16/fp16 matmuls go through oneDNN, which builds (JIT-compiles) a kernel per shape and caches
# it (1024 entries). Each expert's row count changes with every batch, so the shapes kept changing
# and a training step paid for new kernels (and fresh memory for them) again and again: 509 ms against
# 420 ms for a bf16 step of the bench model with a new batch each step. Groups padded with zero rows to
# a multiple of ROW_QUANTUM take a few dozen shapes that stay cached, for about ROW_QUANTUM / 2 rows of
# padding per expert (~3% of the expert FLOPs at 256 rows each). fp32 (MKL) and CUDA need none of it.
ROW_QUANTUM = 16


def row_quantum(xs: Tensor) -> int:
    """The multiple to pad each expert's rows to before the grouped matmuls (1: no padding)."""
    if xs.device.type == "cpu" and xs.dtype in (torch.bfloat16, torch.float16):
        return ROW_QUANTUM
    return 1


def _padded_groups_swiglu(
    xs: Tensor, counts: Tensor, w13: Tensor, w2: Tensor, rw: Tensor, quantum: int
) -> Tensor:
    """grouped_swiglu with every group padded with zero rows to a multiple of `quantum`: xs (M, C)
    sorted by expert, counts (E,) -> (M, C). The padded buffer has a fixed size (an upper bound), so
    there is no host sync; rows past the last group are never computed and never read back."""
    M, E = xs.shape[0], counts.shape[0]
    padded = (counts + (quantum - 1)) // quantum * quantum  # (E,)
    shift = (padded - counts).cumsum(0) - (padded - counts)  # (E,) padded start - real start
    rows = torch.arange(M, device=xs.device)
    expert = torch.searchsorted(counts.cumsum(0), rows, right=True)  # (M,) expert of each row
    dst = rows + shift[expert]  # (M,) each row's place in the padded layout
    size = M + E * (quantum - 1)
    xp = xs.new_zeros(size, xs.shape[1]).index_copy(0, dst, xs)  # (size, C)
    rwp = rw.new_zeros(size).index_copy(0, dst, rw)
    offs = padded.cumsum(0).to(torch.int32)
    return grouped_swiglu(xp, w13, w2, offs, rwp)[0].index_select(0, dst)


def run_experts(
    xs: Tensor,
    counts: Tensor,
    w13: Tensor,
    w2: Tensor,
    capacity: int | None = None,
    row_weights: Tensor | None = None,
) -> Tensor:
    """SwiGLU of stacked experts w13 (E, 2I, C), w2 (E, C, I) on xs (M, C) sorted by expert, counts
    (E,) rows each -> (M, C): two grouped matmuls, or a padded bmm where that kernel is unavailable.
    Shared by Experts (all experts) and runtime/distributed/expert_parallel.py (this process's experts)."""
    dt = compute_dtype(xs)
    xs, w13, w2 = xs.to(dt), w13.to(dt), w2.to(dt)
    if grouped_mm_ok(xs, w13, w2):
        rw = xs.new_ones(xs.shape[0]) if row_weights is None else row_weights.to(dt)
        quantum = row_quantum(xs)
        if quantum > 1:
            return _padded_groups_swiglu(xs, counts, w13, w2, rw, quantum)
        offs = counts.cumsum(0).to(torch.int32)
        return grouped_swiglu(xs, w13, w2, offs, rw)[0]
    y = _padded_bmm(xs, counts, w13, w2, capacity)
    return y if row_weights is None else y * row_weights.to(dt).unsqueeze(1)


def _padded_bmm(
    xs: Tensor, counts: Tensor, w13: Tensor, w2: Tensor, capacity: int | None
) -> Tensor:
    # every expert's rows padded to C slots, then two bmm's; C needs one host sync when dropless
    M, E = xs.shape[0], w13.shape[0]
    C = int(counts.max()) if capacity is None else min(capacity, M)
    C = max(C, 1)
    starts = counts.cumsum(0) - counts  # (E,)
    slot = torch.arange(C, device=xs.device)
    valid = slot[None, :] < counts[:, None]  # (E, C)
    src = torch.where(valid, starts[:, None] + slot[None, :], M)  # padding reads the zero row
    xp = torch.cat([xs, xs.new_zeros(1, xs.shape[1])])[src]  # (E, C, C_in)
    h = torch.bmm(xp, w13.transpose(1, 2))  # (E, C, 2I)
    g, u = h.chunk(2, dim=-1)
    y = torch.bmm(F.silu(g) * u, w2.transpose(1, 2)).flatten(0, 1)  # (E*C, C_in)
    # row r of the sorted input sits in slot r - starts[e] of its expert e
    expert_of_row = torch.repeat_interleave(
        torch.arange(E, device=xs.device), counts, output_size=M
    )
    row = torch.arange(M, device=xs.device)
    return y[expert_of_row * C + row - starts[expert_of_row]]
