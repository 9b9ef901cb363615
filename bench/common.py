"""Shared benchmark helpers: timing by medians and the result record."""

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
        return {**asdict(self), "holds": self.holds}


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


def interleaved_medians(functions, repeats, warmup=1):
    """Median times of several functions, run round-robin so machine noise hits all alike."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
