"""Transformer: shapes, causality, MLA query variants, layer layout, rotary."""

import pytest
import torch

from generated.config import ModelConfig
from helpers import debug_model, debug_model_config, training_loss
from runtime.models.deepseek_v3.kernels import causal_attention
from runtime.models.deepseek_v3.model import (
    MLA,
    MLP,
    RMSNorm,
    Transformer,
    apply_rotary,
    model_rotary_tables,
    rotary_tables,
)
from runtime.models.deepseek_v3.moe import MoE


def make_model(**kw):
    return debug_model(**{"n_layers": 3, "v_head_dim": 12, "max_seq_len": 32, "mtp_depth": 1, **kw})


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_shapes_and_backward(q_lora_rank):
    model = make_model(q_lora_rank=q_lora_rank)
    attn = model.layers[0].attn
    if q_lora_rank:
        assert not hasattr(attn, "wq") and attn.wq_a.weight.shape == (12, 32)
        assert attn.wq_b.weight.shape == (2 * (8 + 4), 12) and attn.q_norm.weight.shape == (12,)
    else:
        assert attn.wq.weight.shape == (2 * (8 + 4), 32) and not hasattr(attn, "wq_a")
    assert attn.wkv_a.weight.shape == (8 + 4, 32)
    assert attn.wkv_b.weight.shape == (2 * (8 + 12), 8)
    assert attn.wo.weight.shape == (32, 2 * 12)
    tokens = torch.randint(0, 64, (3, 10))
    assert model(tokens).logits.shape == (3, 10, 64)
    out = training_loss()(model, torch.randint(0, 64, (3, 12)), 0)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_layer_layout():
    model = make_model(n_layers=3, first_k_dense=2, mtp_depth=2)
    assert [type(b.ffn) for b in model.layers] == [MLP, MLP, MoE]
    assert all(isinstance(m.block.ffn, MoE) for m in model.mtp)
    assert [i for i, _ in model.moe_layers()] == [2, 3, 4]
    assert model.embed.weight.data_ptr() != model.head.weight.data_ptr()  # untied
    shared = model.layers[2].ffn.shared_experts
    assert shared.w1.weight.shape == (16, 32)  # n_shared_experts * moe_inter_dim
    assert model.layers[2].ffn.experts.w13.shape == (4, 32, 32)
    assert model.layers[2].ffn.experts.w2.shape == (4, 32, 16)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_causal(q_lora_rank):
    model = make_model(q_lora_rank=q_lora_rank).eval()
    tokens = torch.randint(0, 64, (2, 16))
    base = model(tokens).logits
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % 64
    out = model(changed).logits
    torch.testing.assert_close(out[:, :9], base[:, :9])
    assert (out[:, 9:] - base[:, 9:]).abs().max() > 1e-3


def test_sequence_too_long():
    model = make_model(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_rotary_is_relative_and_interleaved():
    cos, sin = rotary_tables(8, 64, 10000.0)
    q = torch.randn(1, 1, 1, 8).expand(1, 64, 1, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 64, 1, 8)
    rq, rk = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    dots = rq[0, :, 0] @ rk[0, :, 0].T  # (T, T), depends only on the offset
    torch.testing.assert_close(dots[5, 2], dots[40, 37])
    torch.testing.assert_close(dots[3, 10], dots[20, 27])
    # the pair (x0, x1) rotates by the first frequency (angle = position): position 1 rotates (1, 0)
    x = torch.zeros(1, 2, 1, 8)
    x[..., 0] = 1.0
    r = apply_rotary(x, cos, sin)[0, 1, 0]  # layout: rotated evens, then rotated odds
    torch.testing.assert_close(r[0], torch.cos(torch.tensor(1.0)))
    torch.testing.assert_close(r[4], torch.sin(torch.tensor(1.0)))


def test_attention_softmax_scale():
    cfg = ModelConfig(
        dim=16, n_heads=2, kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=2, v_head_dim=4
    )
    assert MLA(cfg).softmax_scale == pytest.approx(8**-0.5)


@pytest.mark.parametrize("T", [5, 128, 300])  # one block, one full block, three uneven blocks
def test_blocked_causal_attention_matches_sdpa(T):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, T, 12, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, T, 8, generator=g, requires_grad=True)
    w = torch.randn(2, 3, T, 8, generator=g)
    out = causal_attention(q, k, v, 0.3)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_blocked_causal_attention_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 260, 12, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 260, 8, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_attention(q, k, v, 0.3)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.1)


def test_rmsnorm_fp32_backward_matches_autograd():
    norm = RMSNorm(24, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 24, dtype=torch.float64)
    # reference: the composite formula in float64, autograd's backward
    ref = norm.weight.double() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    ref_gx, ref_gw = torch.autograd.grad((ref * g).sum(), (x, norm.weight))
    xf = x.detach().float().requires_grad_(True)
    out = norm(xf)  # fp32: the hand-written backward
    gx, gw = torch.autograd.grad((out * g.float()).sum(), (xf, norm.weight))
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), ref_gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), ref_gw.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer_id", [0, 1])  # dense, MoE
def test_recomputed_block_keeps_only_its_half_inputs(layer_id):
    import copy

    from bench.memory_bench import saved_for_backward_bytes

    cfg = debug_model_config(first_k_dense=1)
    plain = debug_model(first_k_dense=1).layers[layer_id].train()  # initialised weights
    recomputed = copy.deepcopy(plain)
    recomputed.recompute = True
    cos, sin = model_rotary_tables(cfg)
    x = torch.randn(2, 9, cfg.dim, requires_grad=True)
    grads, saved = {}, {}
    for name, block in (("plain", plain), ("recomputed", recomputed)):

        def step(block=block, name=name):
            y, terms = block(x, cos, sin)
            loss = y.square().mean() + sum(a + z for a, z in terms)
            grads[name] = torch.autograd.grad(loss, [x, *block.parameters()])

        saved[name] = saved_for_backward_bytes(block, step)
    for a, b in zip(grads["plain"], grads["recomputed"]):
        torch.testing.assert_close(a, b)
    # the block input and the attention half's output, the rotary tables, and the test loss's y
    assert saved["recomputed"] <= 3 * x.nbytes + cos.nbytes + sin.nbytes
    assert saved["plain"] > 3 * saved["recomputed"]


def test_a_model_built_on_meta_then_initialised_equals_one_built_whole():
    # what the trainer does under FSDP2 / expert parallelism (before sharding; the per-shard fill is
    # tests/test_parallel.py's layouts agreeing with one process)
    whole = make_model()
    after_whole = torch.rand(3)
    torch.manual_seed(0)
    with torch.device("meta"):
        lazy = Transformer(whole.config)
    after_lazy = torch.rand(3)
    assert all(p.is_meta for p in lazy.parameters())
    assert torch.equal(after_whole, after_lazy)  # construction draws the same from the global RNG
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    for (name, a), b in zip(whole.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(whole.rope_cos, lazy.rope_cos) and torch.equal(whole.rope_sin, lazy.rope_sin)
    experts = whole.layers[1].ffn.experts.w13
    assert experts.std().item() == pytest.approx(whole.config.init_std, rel=0.1)
    assert not torch.equal(experts[0], experts[1])  # each expert its own draw


def test_weights_depend_on_the_seed():
    a, b = make_model(), make_model()
    torch.manual_seed(1)
    c = Transformer(a.config)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)
    assert not torch.equal(a.layers[1].ffn.experts.w2, c.layers[1].ffn.experts.w2)
