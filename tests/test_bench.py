"""Benchmark harness smoke tests: the results.json structure, the FLOP count, the HF peer's weights.
No timing is asserted."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, debug_model


@pytest.mark.slow
def test_quick_moe_bench_writes_results(tmp_path):
    out = tmp_path / "results.json"
    subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "moe_bench", "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    results = json.loads(out.read_text())
    machine = results["machine"]
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] >= 1
    assert results["quick"] is True and "moe_bench" in results["suites"]
    assert len(results["targets"]) == 2
    for t in results["targets"]:
        assert {"name", "figure", "target", "holds", "higher_is_better", "unit", "detail"} <= set(t)
        assert isinstance(t["holds"], bool)
        bound_ok = (
            t["figure"] >= t["target"] if t["higher_is_better"] else t["figure"] <= t["target"]
        )
        assert t["holds"] == bound_ok
    figures = results["suites"]["moe_bench"]["figures"]
    assert set(figures["median_ms"]) >= {"dense", "moe8", "moe64", "loop8", "loop64"}
    assert figures["host_syncs_per_fwd_bwd"]["grouped"] == {"8": 0, "16": 0, "32": 0, "64": 0}
    assert 0 < figures["profile_moe64"]["gemm_share"] <= 1


def _tiny(**kw):
    return debug_model(
        **{"n_layers": 3, "max_seq_len": 32, "n_routed_experts": 8, "n_shared_experts": 1, **kw}
    )


@pytest.mark.parametrize("mtp_depth", [0, 1])
def test_model_flops_by_hand(mtp_depth):
    from bench.trainer_bench import model_flops

    model = _tiny(mtp_depth=mtp_depth)
    C, V, B, T, H = 32, 64, 2, 16, 2
    attn = C * H * 12 + C * (8 + 4) + 8 * H * 16 + H * 8 * C  # wq, wkv_a, wkv_b, wo
    dense = 3 * C * 64
    moe = 8 * C + 3 * C * 16 + 2 * 3 * C * 16  # router, shared, top-2 of 8 routed
    mtp = mtp_depth * (2 * C * C + attn + moe)  # eh_proj + block
    active = 3 * attn + dense + 2 * moe + mtp + V * C * (1 + mtp_depth)
    attention = (3 + mtp_depth) * 3 * 2 * B * H * T * (T + 1) / 2 * (12 + 8)
    assert model_flops(model, B, T) == 6 * active * B * T + attention


def test_hf_peer_gets_our_weights():
    pytest.importorskip("transformers")
    from bench.trainer_bench import _hf_peer

    model = _tiny().eval()
    peer = _hf_peer(model).eval()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens).logits - peer(input_ids=tokens).logits).abs().max().item() < 1e-4


def test_allocation_peak_and_memory_peak():
    from bench.common import allocation_peak, memory_peak

    assert allocation_peak([]) == (0, 0)
    assert allocation_peak([4, 8, -4, 2, -10]) == (12, 0)
    assert allocation_peak([-4, 2]) == (0, -2)  # frees of memory allocated before the call

    def work():
        a = torch.ones(256, 1024)  # 1 MiB
        b = torch.ones(256, 1024)
        del a, b
        torch.ones(128, 1024)

    peak, net = memory_peak(work)
    assert peak >= 2 * 2**20 and net <= 2**20


def test_generation_bench_compares_every_token():
    from bench.generation_bench import first_mismatch

    a = torch.tensor([[1, 2, 3, 4]])
    assert first_mismatch(a, a.clone()) is None
    assert first_mismatch(a, torch.tensor([[1, 2, 9, 4]])) == 2
    assert first_mismatch(a, a[:, :3]) == 3  # a shorter output is not equal
    batch = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert first_mismatch(batch, torch.tensor([[1, 2, 3], [4, 0, 6]])) == 1


def test_checkpointed_blocks_keep_the_gradients():
    from bench.memory_bench import saved_for_backward_bytes
    from generated.config import MoETrainingConfig, MTPTrainingConfig
    from generated.names import ActivationCheckpointing
    from runtime.components.loss import TrainingLoss
    from runtime.models.deepseek_v3.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    plain = _tiny().train()
    wrapped = _tiny().train()
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped, ActivationCheckpointing.FULL)
    loss = TrainingLoss(MoETrainingConfig(), MTPTrainingConfig())
    window = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    saved = {}
    for name, model in (("plain", plain), ("wrapped", wrapped)):
        saved[name] = saved_for_backward_bytes(
            model, lambda m=model: loss(m, window, 0).loss.backward()
        )
    for p, q in zip(plain.parameters(), wrapped.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), "checkpointing changed a gradient"
    assert 0 < saved["wrapped"] < saved["plain"]


@pytest.mark.slow
def test_quick_memory_and_generation_benches(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "results.json"
    subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "memory_bench", "generation_bench"]
        + ["--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    results = json.loads(out.read_text())
    names = [t["name"] for t in results["targets"]]
    assert any("peak memory" in n and "checkpointing" in n for n in names)
    assert any(n.startswith("generation tokens/s vs HF generate") for n in names)
    memory = results["suites"]["memory_bench"]["figures"]["step_peak_mb"]
    assert 0 < memory["ours_checkpointed"] < memory["ours"]  # checkpointing lowers our peak
    generation = results["suites"]["generation_bench"]["figures"]
    assert generation["tokens_equal"] and len(generation["tokens"]) == generation["new_tokens"]


def test_bf16_targets_on_a_cpu_without_native_bf16_say_why_and_do_not_hold():
    from bench.trainer_bench import _unmeasured_bf16

    suite = {
        "model_gflops_per_step": {"ours": 104.0},
        "peak_gflops_bf16": 0.26,
        "peak_gflops": 143.0,
        "step_ms": {"ours": 900.0},
    }
    target = _unmeasured_bf16("trainer step tokens/s vs HF, 16 experts (bf16 autocast)", suite, 1.5)
    record = target.as_dict()
    assert record["figure"] is None and record["holds"] is False
    json.dumps(record, allow_nan=False)  # results.json stays strict JSON
    assert "not measured" in target.detail and "0.26 GFLOP/s" in target.detail
    assert "(550x)" in target.detail and "about 400 s against 900 ms" in target.detail


def test_the_config_benchs_omegaconf_side_reads_the_full_config():
    """OmegaConf types the counts of configs/deepseek_v3.yaml (`14.3T tokens`) as int: the
    bench gives it the same config with the counts as steps, which must load into the same
    dataclasses ours builds from the file as written."""
    from omegaconf import OmegaConf

    import generated
    from bench.config_bench import FULL_CONFIG, _for_omegaconf

    merged = OmegaConf.merge(
        OmegaConf.structured(generated.Config), OmegaConf.load(_for_omegaconf())
    )
    theirs = OmegaConf.to_object(merged)
    assert theirs == generated.load_config(FULL_CONFIG)
