"""DeepSeekMoE layer: dispatch vs reference loop, capacity dropping, losses, noise, bias balancing."""

import math

import pytest
import torch
import torch.nn.functional as F

from generated.config import MoETrainingConfig
from helpers import debug_model_config, training_loss
from runtime.components.balancer import MoEBalancer
from runtime.models.deepseek_v3 import kernels
from runtime.models.deepseek_v3 import moe as moe_mod
from runtime.models.deepseek_v3.model import MLP, Transformer
from runtime.models.deepseek_v3.moe import MoE, RoutingKnobs, capacity_keep

LOSS = training_loss()

DIM = 32


def model_cfg(**kw):
    return debug_model_config(**{"n_routed_experts": 8, "n_shared_experts": 1, **kw})


def make_moe(model_kw=None, **moe_kw):
    cfg = model_cfg(**(model_kw or {}))
    knobs = RoutingKnobs.from_config(MoETrainingConfig(**moe_kw))
    layer = MoE(cfg, knobs, MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim))
    torch.manual_seed(0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def stub_router(layer, scores, idx, weights=None):
    """Make the layer's router return fixed scores/choices for every call."""
    logits = torch.logit(scores)
    if weights is None:
        weights = scores.gather(1, idx)

    def forward(x):
        return logits, scores, idx, weights

    layer.gate.forward = forward


@pytest.mark.parametrize(
    "model_kw,moe_kw",
    [
        ({}, {}),
        ({"n_group": 4, "topk_group": 2, "top_k": 3, "route_scale": 2.5}, {}),
        ({"score_func": "softmax", "norm_topk_prob": False}, {}),
        ({}, {"drop_tokens": True, "capacity_factor": 0.5}),
    ],
)
@pytest.mark.parametrize("grouped", [True, False])
def test_dispatch_matches_reference_loop(model_kw, moe_kw, grouped, monkeypatch):
    layer = make_moe(model_kw, **moe_kw).eval()
    with torch.no_grad():
        layer.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(3, 10, DIM)
    assert kernels.grouped_mm_ok(
        x, layer.experts.w13, layer.experts.w2
    )  # CPU fp32 runs _grouped_mm
    if not grouped:  # the padded-bmm path used where _grouped_mm is unavailable
        monkeypatch.setattr(kernels, "grouped_mm_ok", lambda *a: False)

    def run(reference):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out, aux, z = layer(xi, reference=reference)
        (out * torch.linspace(-1, 1, DIM)).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    out, gx, grads = run(False)
    ref, gx_ref, grads_ref = run(True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-5, atol=1e-5, msg=n)
    assert grads["experts.w13"].abs().sum() > 0 and grads["gate.weight"].abs().sum() > 0


def test_capacity_keep_fills_in_position_order_per_sequence():
    # 2 sequences of 4 tokens, top-1 of 2 experts, capacity 2 per expert per sequence
    idx = torch.tensor([[0], [0], [0], [1], [1], [0], [1], [1]])
    keep = capacity_keep(idx, n_seqs=2, n_experts=2, capacity=2)
    # sequence 0: expert 0 gets tokens 0, 1, 2 -> token 2 is dropped, whatever the scores;
    # sequence 1 has its own capacity: expert 1 gets tokens 4, 6, 7 -> 7 is dropped
    assert keep.squeeze(1).tolist() == [True, True, False, True, True, True, True, False]
    # top-2: within a token, the better-ranked slot comes first
    idx2 = torch.tensor([[0, 1], [1, 0], [0, 1]])
    keep2 = capacity_keep(idx2, n_seqs=1, n_experts=2, capacity=2)
    assert keep2.tolist() == [[True, True], [True, True], [False, False]]


def test_capacity_dropping_in_layer():
    # 4 tokens, top-2 of 4 experts, capacity_factor 0.5: capacity = ceil(4*2/4*0.5) = 1
    layer = make_moe({"n_routed_experts": 4, "top_k": 2}, drop_tokens=True, capacity_factor=0.5)
    assert layer.capacity(4) == 1
    scores = torch.tensor(
        [[0.9, 0.8, 0.1, 0.1], [0.95, 0.1, 0.7, 0.1], [0.1, 0.6, 0.1, 0.2], [0.3, 0.1, 0.1, 0.4]]
    )
    idx = torch.tensor([[0, 1], [0, 2], [1, 3], [3, 0]])
    weights = torch.full((4, 2), 0.5)
    stub_router(layer, scores, idx, weights)
    # first come, first served: expert 0 -> token 0 (1 and 3 dropped although 1 scores higher),
    # expert 1 -> token 0 (2 dropped), expert 2 -> token 1, expert 3 -> token 2 (3 dropped)
    expected_keep = torch.tensor([[True, True], [False, True], [False, True], [False, False]])
    r = layer.route(torch.randn(4, DIM))
    assert torch.equal(r.keep, expected_keep) and r.max_rows == 1

    x = torch.randn(1, 4, DIM)
    out, _, _ = layer(x)
    xf = x[0]
    expected = layer.shared_experts(xf).clone()
    for t in range(4):
        for s in range(2):
            if expected_keep[t, s]:
                e = idx[t, s].item()
                g, u = F.linear(xf[t], layer.experts.w13[e]).chunk(2)
                expected[t] += 0.5 * F.linear(F.silu(g) * u, layer.experts.w2[e])
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    # token 3 lost both experts: only the shared experts remain
    torch.testing.assert_close(out[0, 3], layer.shared_experts(xf[3]), rtol=1e-5, atol=1e-6)
    assert layer.stat_dropped.item() == 4  # of 8 assignments
    # eval mode is dropless
    layer.eval()
    assert layer.route(torch.randn(4, DIM)).keep is None
    out_eval, _, _ = layer(x)
    assert (out_eval[0, 3] - layer.shared_experts(xf[3])).abs().max() > 1e-3


def test_token_dropping_is_causal_and_training_only():
    # a whole model with tight capacity: changing tokens after t never changes outputs at or before t
    from helpers import debug_model

    model = debug_model(MoETrainingConfig(drop_tokens=True, capacity_factor=0.5), n_layers=3)
    model.train()
    T = 16
    base = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(base).logits
        assert (
            MoEBalancer(model, MoETrainingConfig()).stats()["moe/dropped_frac"] > 0.2
        )  # dropping is really on
        for t in (3, 8, 12):
            other = base.clone()
            other[:, t + 1 :] = torch.randint(0, 64, (2, T - t - 1))
            out = model(other).logits
            # rounding only (the experts' row counts, so the GEMM shapes, change); a token that
            # lost an expert because of a later one would move its logits by ~1e-2
            torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], rtol=0, atol=1e-6)
            assert (out[:, t + 1 :] - ref[:, t + 1 :]).abs().max() > 1e-4
        # eval (and so sampling) is dropless: same logits as a model that never drops
        model.eval()
        dropless = debug_model(n_layers=3).eval()
        torch.testing.assert_close(model(base).logits, dropless(base).logits)
        assert (model(base).logits - ref).abs().max() > 1e-4


def test_dropless_keeps_everything():
    layer = make_moe(drop_tokens=False, capacity_factor=0.1)
    r = layer.route(torch.randn(20, DIM))
    assert r.keep is None


def test_aux_loss_closed_form():
    layer = make_moe({"n_routed_experts": 4, "top_k": 2})
    B, T, E, K = 2, 3, 4, 2
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.2],
            [0.5, 0.1, 0.7, 0.3],
            [0.2, 0.6, 0.4, 0.9],
            [0.3, 0.3, 0.8, 0.1],
            [0.6, 0.2, 0.2, 0.7],
            [0.1, 0.9, 0.5, 0.4],
        ]
    )
    idx = scores.topk(K, dim=-1).indices
    expected = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        for i in range(E):
            count = sum(int(i in idx[t].tolist()) for t in rows)
            f = E / (K * T) * count
            p = sum((scores[t, i] / scores[t].sum()).item() for t in rows) / T
            expected += f * p
    expected /= B
    assert layer.aux_loss(scores, idx, B, T).item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_closed_form_and_temperature():
    layer = make_moe(router_temperature=2.0).eval()
    x = torch.randn(5, DIM)
    logits, scores, _, _ = layer.gate(x)
    raw = x @ layer.gate.weight.T
    torch.testing.assert_close(logits, raw / 2.0)  # temperature divides the logits
    torch.testing.assert_close(scores, torch.sigmoid(raw / 2.0))
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in (raw / 2.0).tolist()) / 5
    assert layer.z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_temperature_divides_the_logits_before_scoring():
    # seeded input: the test once drew x from whatever RNG state the tests before it left
    x = torch.randn(16, DIM, generator=torch.Generator().manual_seed(0))
    base = make_moe({"norm_topk_prob": True}).eval()
    raw = x @ base.gate.weight.T
    spread = {}
    for t in (0.5, 1.0, 100.0):
        layer = make_moe({"norm_topk_prob": True}, router_temperature=t).eval()
        logits, scores, idx, w = layer.gate(x)
        torch.testing.assert_close(logits, raw / t)
        torch.testing.assert_close(scores, torch.sigmoid(raw / t))
        assert torch.equal(idx, base.gate(x)[2])  # same weights, monotone scoring: same choices
        chosen = scores.gather(1, idx)
        torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True))
        spread[t] = (w - 1 / w.shape[1]).abs().max().item()
    # a high temperature flattens the renormalised weights towards 1/K
    assert spread[100.0] < 0.25 * spread[1.0]


def test_router_noise_only_in_training():
    layer = make_moe(router_noise_scale=1.0)
    x = torch.randn(2, 8, DIM)
    layer.eval()
    a, _, _ = layer(x)
    b, _, _ = layer(x)
    assert torch.equal(a, b)
    assert torch.equal(layer.gate(x.view(-1, DIM))[0], x.view(-1, DIM) @ layer.gate.weight.T)
    layer.train()
    l1 = layer.gate(x.view(-1, DIM))[0]
    l2 = layer.gate(x.view(-1, DIM))[0]
    assert not torch.equal(l1, l2)
    noise = l1 - x.view(-1, DIM) @ layer.gate.weight.T
    assert 0.7 < noise.std().item() < 1.3  # N(0, 1)
    quiet = make_moe(router_noise_scale=0.0).train()
    assert torch.equal(quiet.gate(x.view(-1, DIM))[0], quiet.gate(x.view(-1, DIM))[0])


def test_bias_selects_but_does_not_weight():
    layer = make_moe({"n_routed_experts": 4, "top_k": 1, "norm_topk_prob": False}).eval()
    x = torch.randn(6, DIM)
    logits, scores, _, _ = layer.gate(x)
    with torch.no_grad():
        layer.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    _, _, idx, w = layer.gate(x)
    assert (idx == 3).all()
    torch.testing.assert_close(w[:, 0], torch.sigmoid(logits[:, 3]))


def skewed_model(speed):
    cfg = model_cfg(n_layers=2, first_k_dense=1, n_routed_experts=4, top_k=1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    return model, MoEBalancer(model, MoETrainingConfig(bias_update_speed=speed))


def test_bias_update_moves_load_towards_balance():
    layer = make_moe({"n_routed_experts": 4, "top_k": 1}, bias_update_speed=0.02).train()
    x = torch.randn(4, 32, DIM)
    x[..., 0] = 3.0
    with torch.no_grad():  # expert 0 wins every token: logit ~6 against ~0
        layer.gate.weight.mul_(0.1)
        layer.gate.weight[0, 0] = 2.0
    ratios = []
    for _ in range(30):
        with torch.no_grad():
            layer(x)
        load = layer.load_counts.float()
        ratios.append((load.max() / load.mean()).item())
        layer.update_bias(load, 0.02)
        layer.load_counts = None
    assert ratios[0] == 4.0  # all tokens on one expert
    assert max(ratios[-4:]) < 1.6
    bias = layer.gate.e_score_correction_bias
    assert bias[0] < 0 and (bias[1:] > bias[0]).all()


def test_model_bias_update_formula():
    model, balancer = skewed_model(speed=0.05)
    model.train()
    window = torch.randint(0, 64, (4, 33))
    for _ in range(2):  # two micro-batches accumulate before one update
        with torch.no_grad():
            LOSS(model, window, 0)
    load = model.layers[1].ffn.load_counts.clone()
    assert load.sum() == 2 * 4 * 32
    balancer.update()
    expected = 0.05 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(model.layers[1].ffn.gate.e_score_correction_bias, expected)
    assert model.layers[1].ffn.load_counts is None  # reset after the update


def test_bias_update_off_and_eval_not_counted():
    model, balancer = skewed_model(speed=0.0)
    model.train()
    window = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        LOSS(model, window, 0)
    balancer.update()
    assert model.layers[1].ffn.gate.e_score_correction_bias.abs().sum() == 0
    model.eval()
    balancer.reset_stats()
    with torch.no_grad():
        LOSS(model, window, 0)
        model(window)
    assert model.layers[1].ffn.load_counts is None and balancer.stats() == {}


def test_moe_stats():
    model, balancer = skewed_model(speed=0.0)
    model.train()
    window = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        LOSS(model, window, 0)
        LOSS(model, window, 0)
    stats = balancer.stats()
    tpe = stats["moe/layer1/tokens_per_expert"]
    assert len(tpe) == 4 and sum(tpe) == 2 * 2 * 16  # two calls, B*T tokens, top-1
    assert stats["moe/layer1/max_load"] == max(tpe)
    assert stats["moe/layer1/mean_load"] == pytest.approx(16.0)
    assert stats["moe/layer1/cv"] == pytest.approx(
        torch.tensor(tpe, dtype=torch.float64).std(unbiased=False).item() / 16
    )
    assert stats["moe/layer1/dropped_frac"] == 0.0
    assert stats["moe/max_load_ratio"] == pytest.approx(max(tpe) / 16)
    balancer.reset_stats()
    assert balancer.stats() == {}


def _ddp_worker(rank, world, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, balancer = skewed_model(speed=0.01)
        model.train()
        torch.manual_seed(100 + rank)  # different data on each rank
        with torch.no_grad():
            LOSS(model, torch.randint(0, 64, (2, 17)), 0)
        local = model.layers[1].ffn.load_counts.clone()
        balancer.update()
        results[rank] = (local, model.layers[1].ffn.gate.e_score_correction_bias.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bias_update_all_reduces_loads(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
        (l0, b0), (l1, b1) = results[0], results[1]
    assert not torch.equal(l0, l1)
    total = (l0 + l1).float()
    torch.testing.assert_close(b0, 0.01 * torch.sign(total.mean() - total))
    torch.testing.assert_close(b0, b1)


def test_grouped_dispatch_with_empty_experts():
    # 3 tokens, top-2 of 16: most experts get no rows; their weight grads must be zeros
    layer = make_moe({"n_routed_experts": 16})
    x = torch.randn(1, 3, DIM)

    def run(reference):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out, aux, _ = layer(xi, reference=reference)
        (out.sum() + aux).backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    (out, gx, grads), (ref, gx_ref, grads_ref) = run(False), run(True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-5, atol=1e-5, msg=n)
    assert (grads["experts.w13"].flatten(1).abs().sum(1) == 0).sum() >= 10


def test_moe_compiles_in_one_graph():
    # fullgraph: routing, counts, dispatch and the grouped-SwiGLU custom ops trace without a break
    layer = make_moe().train()
    x = torch.randn(2, 6, DIM)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)

    def run(module):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        out, aux, z = module(xi)
        (out.sum() + aux + z).backward()
        return out.detach(), xi.grad, layer.experts.w13.grad.clone(), layer.gate.weight.grad.clone()

    for a, b in zip(run(compiled), run(layer)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_few_token_inference_path_matches_the_grouped_one():
    moe = make_moe().eval()
    x = torch.randn(1, 3, moe.experts.dim)  # 3 tokens x top-k rows: the few-rows path
    assert x.shape[1] * moe.top_k <= moe_mod.FEW_ROWS
    with torch.no_grad():
        few, _, _ = moe(x)
    grouped, _, _ = moe(x)  # with grad: the grouped dispatch
    torch.testing.assert_close(few, grouped.detach(), atol=1e-6, rtol=1e-5)


def test_mlp_recomputing_backward_matches_autograd():
    torch.manual_seed(0)
    mlp = MLP(16, 24).double()
    x = torch.randn(2, 5, 16, dtype=torch.double, requires_grad=True)
    y = mlp(x)
    ref = mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x))
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, *mlp.parameters()], g)
    theirs = torch.autograd.grad(ref, [x, *mlp.parameters()], g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp.float()(x.detach().float().requires_grad_())
    assert y.dtype == torch.bfloat16


def test_grouped_dispatch_under_bf16_autocast_follows_fp32():
    # bf16 rows are gathered and summed in bf16 (cast before the gather), the output widened to fp32
    layer = make_moe().train()
    x = torch.randn(2, 16, DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ref, _, _ = layer(x)
    ref_grads = torch.autograd.grad(ref.sum(), [x, layer.experts.w13])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, _ = layer(x)
        grads = torch.autograd.grad(out.float().sum(), [x, layer.experts.w13])
    assert out.dtype == torch.float32  # the residual stream stays fp32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0.05, atol=0.1)


def test_bf16_cpu_groups_are_padded_to_the_row_quantum_and_match_unpadded(monkeypatch):
    # CPU bf16: each expert's rows are padded with zeros to a multiple of ROW_QUANTUM (a few cached
    # oneDNN kernel shapes instead of one per row count); outputs and every gradient are unchanged
    g = torch.Generator().manual_seed(0)
    E, C, I = 5, 32, 16
    counts = torch.tensor([0, 16, 17, 1, 30])  # empty, exact multiple, one over, one row, 2 short
    M = int(counts.sum())
    xs = torch.randn(M, C, generator=g).bfloat16().requires_grad_()
    w13 = (torch.randn(E, 2 * I, C, generator=g) * 0.2).requires_grad_()
    w2 = (torch.randn(E, C, I, generator=g) * 0.2).requires_grad_()
    rw = torch.rand(M, generator=g).requires_grad_()
    gy = torch.randn(M, C, generator=g).bfloat16()
    seen = []
    grouped = kernels.grouped_swiglu

    def spy(xs_, w13_, w2_, offs, rw_):
        seen.append(offs.clone())
        return grouped(xs_, w13_, w2_, offs, rw_)

    monkeypatch.setattr(kernels, "grouped_swiglu", spy)

    def run(quantum):
        monkeypatch.setattr(kernels, "ROW_QUANTUM", quantum)
        y = kernels.run_experts(xs, counts, w13, w2, row_weights=rw)
        return (y, *torch.autograd.grad(y, [xs, w13, w2, rw], gy))

    padded, plain = run(16), run(1)
    assert kernels.row_quantum(xs) == 1  # the second run took the unpadded path
    sizes = torch.diff(seen[0], prepend=seen[0].new_zeros(1))
    assert sizes.tolist() == [0, 16, 32, 16, 32]
    assert torch.equal(seen[1], counts.cumsum(0).int())
    for a, b in zip(padded, plain):
        assert a.dtype == b.dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    assert kernels.row_quantum(xs.float()) == 1  # fp32 (MKL) keeps exact groups
