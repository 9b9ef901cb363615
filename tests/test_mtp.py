"""Multi-token prediction: loss weighting, warm-up ramp, inputs and targets of each depth."""

import pytest
import torch
import torch.nn.functional as F

from generated.config import MoETrainingConfig, MTPTrainingConfig
from helpers import debug_model_config
from runtime.components.loss import TrainingLoss
from runtime.models.deepseek_v3.model import Transformer
from runtime.models.deepseek_v3.moe import RoutingKnobs


class Model:
    """A debug Transformer and the training loss of its sections; compute_loss(window, step)."""

    def __init__(self, depth=2, mtp_loss_weight=0.3, warmup_steps=0, **moe_kw):
        torch.manual_seed(0)
        moe = MoETrainingConfig(**moe_kw)
        mtp = MTPTrainingConfig(mtp_loss_weight=mtp_loss_weight, warmup_steps=warmup_steps)
        self.net = Transformer(debug_model_config(mtp_depth=depth), RoutingKnobs.from_config(moe))
        self.loss = TrainingLoss(moe, mtp)
        self.mtp_weight = self.loss.mtp_weight

    def compute_loss(self, window, step):
        return self.loss(self.net, window, step)

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, tokens):
        return self.net(tokens).logits

    def eval(self):
        self.net.eval()
        return self

    def train(self):
        self.net.train()
        return self


make_model = Model


def test_warmup_ramp():
    model = make_model(warmup_steps=10, mtp_loss_weight=0.3)
    assert model.mtp_weight(0) == 0.0
    assert model.mtp_weight(5) == pytest.approx(0.15)
    assert model.mtp_weight(10) == pytest.approx(0.3)
    assert model.mtp_weight(25) == pytest.approx(0.3)
    assert make_model(warmup_steps=0).mtp_weight(0) == pytest.approx(0.3)
    model = make_model(depth=0)
    assert model.compute_loss(torch.randint(0, 64, (2, 13)), 100).mtp_weight == 0.0


@pytest.mark.parametrize("step", [0, 4, 50])
def test_loss_composition(step):
    model = make_model(depth=2, warmup_steps=8, aux_loss_weight=0.01, z_loss_weight=0.001).eval()
    window = torch.randint(0, 64, (2, 12 + 1 + 2))
    out = model.compute_loss(window, step)
    w = 0.3 * min(1.0, step / 8)
    assert out.mtp_weight == pytest.approx(w)
    assert len(out.mtp_losses) == 2
    expected = (
        out.main_loss
        + w * (out.mtp_losses[0] + out.mtp_losses[1]) / 2
        + 0.01 * out.aux_loss
        + 0.001 * out.z_loss
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss > 0 and out.z_loss > 0


def test_no_mtp():
    model = make_model(depth=0, aux_loss_weight=0.0, z_loss_weight=0.0).eval()
    window = torch.randint(0, 64, (2, 13))
    out = model.compute_loss(window, 0)
    assert out.mtp_losses == [] and out.mtp_weight == 0.0
    torch.testing.assert_close(out.loss, out.main_loss)
    logits = model(window[:, :12])
    torch.testing.assert_close(
        out.main_loss, F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
    )


def test_depth_inputs_targets_and_embedding_first_concat():
    D, T = 2, 10
    model = make_model(depth=D).eval()
    window = torch.randint(0, 64, (2, T + 1 + D))
    seen = []
    hooks = [
        m.eh_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
        for m in model.mtp
    ]
    out = model.compute_loss(window, 0)
    for h in hooks:
        h.remove()

    # rebuild the chain by hand: h_0 is the main trunk's output after the final norm (what vLLM
    # and SGLang feed DeepSeek-V3's released MTP layer), h_k module k's after its own norm
    with torch.no_grad():
        trunk = model.embed(window[:, :T])
        for layer in model.layers:
            trunk, _ = layer(trunk, model.rope_cos, model.rope_sin)
        h = model.norm(trunk)
        torch.testing.assert_close(model.head(h), model(window[:, :T]))
        assert (seen[0][..., 32:] - model.mtp[0].hnorm(trunk)).abs().max() > 1e-4  # not pre-norm
        for k, module in enumerate(model.mtp, start=1):
            emb = model.embed(window[:, k : T + k])
            cat = seen[k - 1]  # (B, T, 2C): [enorm(embedding); hnorm(previous hidden)]
            torch.testing.assert_close(cat[..., :32], module.enorm(emb))
            torch.testing.assert_close(cat[..., 32:], module.hnorm(h))
            h, _ = module.block(module.eh_proj(cat), model.rope_cos, model.rope_sin)
            h = module.norm(h)
            logits = model.head(h)
            target = window[:, k + 1 : T + k + 1]
            torch.testing.assert_close(
                out.mtp_losses[k - 1], F.cross_entropy(logits.flatten(0, 1), target.flatten())
            )


def test_last_target_of_each_depth():
    D, T = 2, 8
    model = make_model(depth=D).eval()
    window = torch.randint(0, 64, (1, T + 1 + D))
    base = model.compute_loss(window, 0)
    # the very last token is a target of depth 2 only
    w2 = window.clone()
    w2[0, -1] = (w2[0, -1] + 1) % 64
    out = model.compute_loss(w2, 0)
    torch.testing.assert_close(out.main_loss, base.main_loss)
    torch.testing.assert_close(out.mtp_losses[0], base.mtp_losses[0])
    assert out.mtp_losses[1] != base.mtp_losses[1]
    # window[T+1] is the last target of depth 1 and an input embedding of depth 2, not seen by the main model
    w3 = window.clone()
    w3[0, T + 1] = (w3[0, T + 1] + 1) % 64
    out = model.compute_loss(w3, 0)
    torch.testing.assert_close(out.main_loss, base.main_loss)
    assert out.mtp_losses[0] != base.mtp_losses[0]


def test_mtp_gradients_follow_weight():
    model = make_model(depth=1, warmup_steps=10, aux_loss_weight=0.0).train()
    window = torch.randint(0, 64, (2, 12))
    model.compute_loss(window, 0).loss.backward()  # weight 0 at step 0
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() == 0
    model.zero_grad()
    model.compute_loss(window, 5).loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())
