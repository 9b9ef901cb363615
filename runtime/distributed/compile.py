"""torch.compile of the training module, from the `system.compile` section."""

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
