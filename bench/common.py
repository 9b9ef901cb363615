"""Shared benchmark helpers: timing by medians and the result record."""

import math
import statistics
import time
from dataclasses import asdict, dataclass


@dataclass
class Target:
    """One benchmark target: a measured figure, the bound it must meet, and whether it does."""

    name: str
    figure: float
    target: float
    higher_is_better: bool
    unit: str = "x"
    detail: str = ""

    @property
    def holds(self):
        return self.figure >= self.target if self.higher_is_better else self.figure <= self.target

    def as_dict(self):
        record = {**asdict(self), "holds": self.holds}
        if math.isnan(self.figure):  # not measured here (the detail says why); JSON has no NaN
            record["figure"] = None
        return record


def median_time(function, repeats, warmup=1):
    """Median wall time of `function()` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(functions, repeats, warmup=1, samples=None):
    """Median times of several functions, run round-robin so machine noise hits all alike.
    If `samples` is a dict, every function's list of times is stored in it."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    if samples is not None:
        samples.update(times)
    return {name: statistics.median(values) for name, values in times.items()}


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")


def profile_summary(function, steps=1, top=10, inclusive=("aten::_grouped_mm",)):
    """Run `function` under torch.profiler (after one warm-up call) and summarise where the time goes,
    per call: self CPU ms of the top ops, the share spent in matmul kernels (GEMM_OPS), and the share
    of the ops named in `inclusive` counted with everything they call (the routed experts' grouped
    matmuls by default)."""
    from torch.profiler import ProfilerActivity, profile

    function()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            function()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "profiled_ms_per_call": total / 1e3 / steps,
        "gemm_share": gemm / total if total else 0.0,
        "inclusive_share": {
            name: sum(e.cpu_time_total for e in events if e.key == name) / total if total else 0.0
            for name in inclusive
        },
        "top_ops_self_ms": {
            e.key: round(e.self_cpu_time_total / 1e3 / steps, 2) for e in events[:top]
        },
    }


def spread(samples):
    """max / min of each function's times: how noisy its median is."""
    return {name: max(values) / min(values) for name, values in samples.items()}


def allocation_peak(events):
    """(peak, net) of a sequence of allocation sizes in bytes (negative: a free), in order: the
    highest running total above the start, and where it ends."""
    total = peak = 0
    for nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak, total


def memory_peak(function):
    """Run `function()` once under torch.profiler's memory tracking and return (peak, net) bytes of
    tensor memory allocated through PyTorch's allocator above what was allocated before the call.
    Unlike the process's RSS this ignores malloc's caching and the interpreter, and it needs no
    fresh process: every allocation and free during the call is an event, in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return allocation_peak(e.nbytes() for e in events)
