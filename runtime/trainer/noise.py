"""Router noise of a training step (moe.router_noise_scale): drawn from a generator seeded by the
run's seed, the process and the step, so it differs between processes and a resumed run draws the
same noise as an uninterrupted one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from generated.config import MoETrainingConfig


def router_noise_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the router noise of one optimizer step on one process: different on every rank
    (the noise of a data-parallel run must not repeat across processes) and a function of the step,
    so a resumed run draws the same noise as an uninterrupted one."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


@contextlib.contextmanager
def router_noise_rng(
    moe_cfg: MoETrainingConfig, seed: int, rank: int, step: int, device: torch.device
) -> Iterator[None]:
    """Run the step's forwards with the global RNG seeded by router_noise_seed (only when router
    noise is on; the RNG state outside is left as it was)."""
    if moe_cfg.router_noise_scale == 0:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(router_noise_seed(seed, rank, step))
        yield
