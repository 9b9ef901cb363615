"""Benchmark harness smoke tests: the results.json structure, the FLOP count, the HF peer's weights.
No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import debug_model

REPO = Path(__file__).resolve().parents[1]


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
