"""`python -m bench [--quick] [--only NAME ...]`: run the benchmarks, print a table, write bench/results.json.

Every figure is a ratio of two things measured side by side in the same run (medians over repeats,
interleaved), so it holds on a noisy shared machine.
"""

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

SUITES = (
    "moe_bench",
    "trainer_bench",
    "memory_bench",
    "generation_bench",
    "config_bench",
    "fsdp_memory",
    "data_bench",
)
RESULTS = Path(__file__).resolve().parent / "results.json"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _machine(malloc):
    import torch

    from runtime.distributed.precision import cpu_native_matmul

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16_matmul": cpu_native_matmul(torch.bfloat16),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "malloc": malloc or "glibc defaults",
        "loadavg_1min_at_start": os.getloadavg()[0],  # other processes' load skews every figure
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke run)")
    parser.add_argument("--only", nargs="*", choices=SUITES, help="run only these suites")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's malloc settings alone"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's, one per core)"
    )
    args = parser.parse_args(argv)
    suites = args.only or SUITES
    import torch

    from runtime.distributed.utils import tune_malloc

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(
            f"warning: load average {load:.1f} before the run: other processes skew every figure "
            "(a thread that loses its core stalls each parallel region)",
            file=sys.stderr,
        )

    malloc = None if args.default_malloc else tune_malloc()
    results = {"machine": _machine(malloc), "quick": args.quick, "suites": {}, "targets": []}
    started = time.perf_counter()
    for name in suites:
        module = importlib.import_module(f"bench.{name}")
        suite_start = time.perf_counter()
        outcome = module.run(quick=args.quick)
        results["suites"][name] = {
            "figures": outcome["figures"],
            "seconds": time.perf_counter() - suite_start,
        }
        results["targets"] += [{"suite": name, **target.as_dict()} for target in outcome["targets"]]
        print(
            f"[{name}] done in {time.perf_counter() - suite_start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    results["seconds"] = time.perf_counter() - started
    results["machine"]["loadavg_1min_at_end"] = os.getloadavg()[0]
    width = max(len(t["name"]) for t in results["targets"]) if results["targets"] else 10
    print(f"{'target':<{width}}  {'figure':>8}  {'target':>8}  holds  detail")
    for t in results["targets"]:
        bound = (">= " if t["higher_is_better"] else "<= ") + f"{t['target']:g}"
        figure = "--" if t["figure"] is None else f"{t['figure']:.2f}"
        holds = "n/a" if t["figure"] is None else "yes" if t["holds"] else "NO"
        print(f"{t['name']:<{width}}  {figure:>8}  {bound:>8}  {holds:<5}  {t['detail']}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
