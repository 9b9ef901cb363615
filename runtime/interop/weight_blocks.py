"""One block of a weight, read without the rest: init_from into a model sharded by FSDP2 / expert
parallelism (each process reads only the blocks it holds), and into a whole model one tensor at a
time.

A "blocks" mapping (name -> a reader) is what sources.py's Source.load_weights copies from; a
reader has `.shape` (the whole weight's) and `reader[index]` (index: one slice per dim) -> that
block as a Tensor. A plain Tensor is one (a trainer checkpoint file read with mmap=True reads only
the pages a block touches); for a Hugging Face folder, `hf_blocks` gives readers over its
safetensors files (safetensors.py: the rows they need, FP8 blocks dequantized with only their own
scales) that stack the per-expert weights into our (E, 2I, C) / (E, C, I) layout expert by expert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from runtime.interop.safetensors import SafetensorsFolder, slice_bounds
from runtime.models.spec import StateDictAdapter


class HFBlocks:
    """Reader of one of our tensors from a Hugging Face folder, by hf_weight_plan's recipe."""

    def __init__(self, folder: SafetensorsFolder, recipe: tuple):
        self.folder, self.recipe = folder, recipe
        kind = recipe[0]
        if kind == "copy":
            self.shape = folder.shape(recipe[1])
        else:
            first = folder.shape(recipe[1][0])  # gate (I, C) or down (C, I)
            odd = [k for keys in recipe[1:] for k in keys if folder.shape(k) != first]
            if odd:  # stacking needs one shape (gate and up alike)
                raise ValueError(f"{odd[0]} is {list(folder.shape(odd[0]))}, not {list(first)}")
            rows = first[0] * (2 if kind == "w13" else 1)
            self.shape = (len(recipe[1]), rows, first[1])

    def __getitem__(self, index: tuple[slice, ...]) -> Tensor:
        kind = self.recipe[0]
        if kind == "copy":
            return self.folder.read(self.recipe[1], index)
        (e0, e1), (r0, r1), _ = slice_bounds(index, self.shape)
        cols = index[2]
        experts = []
        for e in range(e0, e1):
            if kind == "w2":
                experts.append(self.folder.read(self.recipe[1][e], (slice(r0, r1), cols)))
                continue
            # w13: rows [0, I) are the gate's, [I, 2I) the up projection's
            inter = self.shape[1] // 2
            parts = []
            if r0 < inter:
                parts.append(self.folder.read(self.recipe[1][e], (slice(r0, min(r1, inter)), cols)))
            if r1 > inter:
                up = (slice(max(r0, inter) - inter, r1 - inter), cols)
                parts.append(self.folder.read(self.recipe[2][e], up))
            experts.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        return torch.stack(experts)


def hf_blocks(
    path: str, n_layers: int, adapter: StateDictAdapter, fp8_block: Callable[[], tuple[int, int]]
) -> dict[str, HFBlocks]:
    """Our name -> reader, for the weights of the Hugging Face folder `path` (names mapped by the
    family's `adapter`; FP8 blocks of `fp8_block()`)."""
    folder = SafetensorsFolder(path, fp8_block)
    plan, _ = adapter.hf_weight_plan(folder.keys(), n_layers)
    return {name: HFBlocks(folder, recipe) for name, recipe in plan.items()}
