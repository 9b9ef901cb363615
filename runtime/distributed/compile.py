"""torch.compile of the training module, from the `system.compile` section."""

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from generated.config import TorchCompilationConfig


def compile_module(module: nn.Module, compile_cfg: TorchCompilationConfig) -> nn.Module:
    """torch.compile(module, mode=compile_mode) when TorchCompilationConfig.compile is set."""
    if not compile_cfg.compile:
        return module
    # the spec's choices are torch's modes; torch.compile of a Module is an OptimizedModule
    return cast(nn.Module, torch.compile(module, mode=str(compile_cfg.compile_mode)))


def compile_in_place(modules: Iterable[nn.Module], compile_cfg: TorchCompilationConfig) -> int:
    """Compile each module's forward in place (`nn.Module.compile`: the same object, hooks and
    parameter names) when TorchCompilationConfig.compile is set: a pipeline stage's blocks, which
    the schedule calls one by one. Returns how many."""
    if not compile_cfg.compile:
        return 0
    count = 0
    for module in modules:
        module.compile(mode=str(compile_cfg.compile_mode))
        count += 1
    return count
