"""DeepSeek's balancing conventions: the balance loss summed over MoE layers, the scheduled bias
update speed and MTP weight, and router noise that differs per process."""

import pytest
import torch

from generated.config import MoETrainingConfig, MTPTrainingConfig
from helpers import debug_model, training_loss
from runtime.components.balancer import MoEBalancer
from runtime.trainer.noise import router_noise_rng


def test_balance_loss_is_summed_over_moe_layers():
    model = debug_model(n_layers=4, first_k_dense=1, mtp_depth=1).train()
    per_layer = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: per_layer.append(out[1].detach()))
        for _, m in model.moe_layers()
    ]
    out = training_loss()(model, torch.randint(0, 64, (2, 14)), 0)
    for h in hooks:
        h.remove()
    assert len(per_layer) == 4  # 3 main MoE blocks and the MTP block
    torch.testing.assert_close(out.aux_loss, torch.stack(per_layer).sum())
    assert out.aux_loss > 1.5 * torch.stack(per_layer).mean()  # not the mean


def test_bias_update_speed_schedule():
    moe = MoETrainingConfig(
        bias_update_speed=0.01, bias_update_speed_until=5, bias_update_speed_final=0.0
    )
    model = debug_model(moe).train()
    balancer = MoEBalancer(model, moe)
    assert [balancer.bias_update_speed(s) for s in (0, 4, 5, 100)] == [0.01, 0.01, 0.0, 0.0]
    default = MoEBalancer(debug_model(), MoETrainingConfig())
    assert default.bias_update_speed(10**9) == MoETrainingConfig().bias_update_speed
    layers = [m for _, m in model.moe_layers()]

    def step(s):
        model(torch.randint(0, 64, (2, 16)))
        before = torch.stack([m.gate.e_score_correction_bias.clone() for m in layers])
        balancer.update(s)
        return torch.stack([m.gate.e_score_correction_bias for m in layers]) - before

    assert step(4).abs().max().item() == pytest.approx(0.01)
    assert step(5).abs().max().item() == 0.0  # frozen from step 5 on
    assert all(m.load_counts is None for m in layers)  # and the loads are consumed
    moe = MoETrainingConfig(
        bias_update_speed=0.01, bias_update_speed_until=5, bias_update_speed_final=0.002
    )
    model = debug_model(moe).train()
    balancer = MoEBalancer(model, moe)
    layers = [m for _, m in model.moe_layers()]
    assert step(7).abs().max().item() == pytest.approx(0.002)


def test_mtp_loss_weight_schedule():
    mtp = MTPTrainingConfig(
        mtp_loss_weight=0.3, mtp_loss_weight_until=10, mtp_loss_weight_final=0.1
    )
    model, loss = debug_model(mtp_depth=1), training_loss(mtp=mtp)
    assert [loss.mtp_weight(s) for s in (0, 9, 10, 50)] == [0.3, 0.3, 0.1, 0.1]
    ramped = training_loss(mtp=MTPTrainingConfig(warmup_steps=4, mtp_loss_weight_until=10))
    assert ramped.mtp_weight(2) == pytest.approx(0.15) and ramped.mtp_weight(12) == pytest.approx(
        0.1
    )
    window = torch.randint(0, 64, (2, 12))
    out = loss(model.eval(), window, 20)
    assert out.mtp_weight == 0.1
    torch.testing.assert_close(
        out.loss, out.main_loss + 0.1 * out.mtp_losses[0] + 1e-4 * out.aux_loss
    )
    assert training_loss().mtp_weight(10**9) == pytest.approx(0.3)  # no schedule by default


def test_router_noise_differs_per_rank_and_repeats_per_step():
    moe = MoETrainingConfig(router_noise_scale=0.5)
    layer = next(m for _, m in debug_model(moe).moe_layers()).train()
    x = torch.randn(20, 32)
    cpu = torch.device("cpu")

    def logits(rank, step):
        with router_noise_rng(moe, 1337, rank, step, cpu):
            return layer.gate(x)[0]

    torch.manual_seed(5)
    outside = torch.rand(3)
    torch.manual_seed(5)
    r0 = logits(0, 3)
    assert torch.equal(torch.rand(3), outside)  # the global RNG stream is left alone
    torch.testing.assert_close(logits(0, 3), r0)  # same rank and step: same noise (resume-exact)
    assert (logits(1, 3) - r0).abs().max() > 0.1  # another process draws other noise
    assert (logits(0, 4) - r0).abs().max() > 0.1  # and so does the next step
    torch.manual_seed(5)
    with router_noise_rng(MoETrainingConfig(), 1337, 0, 3, cpu):  # noise off: nothing reseeded
        assert torch.equal(torch.rand(3), outside)
