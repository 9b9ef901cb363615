"""`python -m bench.malloc_effect`: the bf16 training step of ours and of HF's DeepseekV3ForCausalLM
(the trainer bench's model, 16 experts, batch 4 x 512), once in a process with glibc's malloc
defaults and once in a process with the settings the trainer makes on CPU (runtime/distributed/utils.py:
tune_malloc). The settings are process-wide, so each case is its own process, and in each the two
steps are timed round-robin.

`make bench` compares the two implementations under the same (tuned) settings. A user who runs HF's
model in a plain Python process gets glibc's defaults, where every step faults its fresh pages in;
this prints how much that alone moves the comparison. Informational: no target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _measure(tuned: bool, repeats: int) -> dict[str, float]:
    """Median ms of our and HF's bf16 step in this process."""
    import torch

    from runtime.distributed.utils import tune_malloc

    from .common import interleaved_medians
    from .trainer_bench import EXPERTS, _hf_step, _our_step, autocast_bf16, bench_models

    if tuned:
        tune_malloc()
    batch, seq = 4, 512
    ours, peer = bench_models(EXPERTS[0], seq)
    window = torch.randint(0, 256, (batch, seq + 2), generator=torch.Generator().manual_seed(0))
    steps = {
        "ours": autocast_bf16(_our_step(ours, ours, window[None, :, : seq + 1], [0])),
        "hf": autocast_bf16(_hf_step(peer, window[None], seq)),
    }
    return {k: v * 1e3 for k, v in interleaved_medians(steps, repeats, warmup=2).items()}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":  # one case, in its own process
        print(json.dumps(_measure(argv[1] == "tuned", int(argv[2]))))
        return
    repeats = 7
    cases = {}
    for case in ("defaults", "tuned"):
        out = subprocess.run(
            [sys.executable, "-m", "bench.malloc_effect", "worker", case, str(repeats)],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        )
        cases[case] = json.loads(out.stdout.strip().splitlines()[-1])
    for case, ms in cases.items():
        print(
            f"glibc malloc {case:8s}: bf16 step ours {ms['ours']:.0f} ms, HF {ms['hf']:.0f} ms, "
            f"HF / ours {ms['hf'] / ms['ours']:.2f}x"
        )
    d, t = cases["defaults"], cases["tuned"]
    print(f"ours as the trainer runs (tuned) vs HF in a plain process: {d['hf'] / t['ours']:.2f}x")


if __name__ == "__main__":
    main()
