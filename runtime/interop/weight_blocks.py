"""One block of a weight, read without the rest: init_from into a model sharded by FSDP2 / expert
parallelism (each process reads only the blocks it holds), and into a whole model one tensor at a
time.

A "blocks" mapping (name -> a reader) is what runtime/interop/sources.py's Source.load_weights copies from;
a reader has `.shape` (the whole weight's) and `reader[index]` (index: one slice per dim) -> that
block as a Tensor. A plain Tensor is one (a trainer checkpoint file read with mmap=True reads only
the pages a block touches); for a Hugging Face folder, `hf_blocks` gives readers over its
safetensors files that read the rows they need (plain reads: no pages stay mapped), dequantize an FP8 block with only its own scales
and stack the per-expert weights into our (E, 2I, C) / (E, C, I) layout expert by expert.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch
from torch import Tensor

from runtime.checkpoint.single_file import CheckpointError
from runtime.models.deepseek_v3.state_dict_adapter import (
    dequantize_fp8,
    fp8_block,
    hf_weight_plan,
    safetensors_files,
)

SCALE_SUFFIX = "_scale_inv"
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) per dim of `index` (unit-step slices) over a tensor of `shape`."""
    out = []
    for i, n in zip(index, shape):
        start, stop, step = i.indices(n)
        assert step == 1, index
        out.append((start, max(start, stop)))
    return out


# safetensors dtype names -> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class _SafetensorsFile:
    """One .safetensors file: its header parsed, a tensor's rows read with plain file reads (not a
    memory map, whose pages would stay resident in this process)."""

    def __init__(self, path: str):
        self.path = path
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        try:
            file_size = os.path.getsize(path)
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > min(file_size - 8, MAX_HEADER):  # checked before reading it
                    raise ValueError(f"a header of {size} bytes in a file of {file_size}")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            self.base = 8 + size
            for key, info in header.items():
                if info["dtype"] not in DTYPES:
                    raise ValueError(f"{key} has dtype {info['dtype']}, which this loader lacks")
                dtype, shape = DTYPES[info["dtype"]], tuple(int(n) for n in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
                if end - start != math.prod(shape) * dtype.itemsize or self.base + end > file_size:
                    raise ValueError(
                        f"{key}: bytes {start}-{end} do not hold a {list(shape)} {info['dtype']} "
                        f"tensor inside the file's {file_size - self.base} data bytes"
                    )
                self.tensors[key] = (dtype, shape, start)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None

    def read(self, key: str, index: tuple[slice, ...]) -> Tensor:
        """tensor[index], reading only the rows (dim 0) the index spans."""
        dtype, shape, start = self.tensors[key]
        if not shape:
            index = ()
        bounds = _bounds(index, shape)
        (r0, r1) = bounds[0] if shape else (0, 1)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        buffer = bytearray((r1 - r0) * row_bytes)
        with open(self.path, "rb") as f:
            f.seek(self.base + start + r0 * row_bytes)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{self.path}: {key} is cut short (the file is truncated)")
        rows = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        rows = rows.view(r1 - r0, *shape[1:]) if shape else rows.view(())
        return rows[(slice(None), *index[1:])] if shape else rows


class SafetensorsFolder:
    """The tensors of a folder's safetensors files (model.safetensors or the shards its
    model.safetensors.index.json names), read on demand: `keys()` (the weights; FP8 scales are
    not keys of their own), `shape(key)`, `read(key, index)` -> float32 for FP8 weights."""

    def __init__(self, folder: str):
        self.folder = folder
        self._where = {}
        for name in safetensors_files(folder):
            file = _SafetensorsFile(os.path.join(folder, name))
            self._where.update({key: file for key in file.tensors})
        scales = {k for k in self._where if k.endswith(SCALE_SUFFIX)}
        for k in sorted(scales):
            if k[: -len(SCALE_SUFFIX)] not in self._where:
                raise KeyError(f"{folder}: {k} has no weight {k[: -len(SCALE_SUFFIX)]}")
        self._keys = [k for k in self._where if k not in scales]
        fp8 = [k for k in self._keys if self._where[k].tensors[k][0] == torch.float8_e4m3fn]
        unscaled = [k for k in fp8 if k + SCALE_SUFFIX not in scales]
        if unscaled:
            raise KeyError(f"{folder}: FP8 weights without a weight_scale_inv: {unscaled[:5]}")
        self._block = None
        if fp8:
            config_path = os.path.join(folder, "config.json")
            with open(config_path) as f:
                self._block = fp8_block(json.load(f), config_path)
        self._fp8 = set(fp8)

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].tensors[key][1]

    def _read(self, key: str, index: tuple[slice, ...]) -> Tensor:
        return self._where[key].read(key, index)

    def read(self, key: str, index: tuple[slice, ...]) -> Tensor:
        """The block `index` of weight `key` (FP8: dequantized with the scales of its blocks)."""
        if key not in self._fp8:
            return self._read(key, index)
        assert self._block is not None
        (r0, r1), (c0, c1) = _bounds(index, self.shape(key))
        br, bc = self._block
        R, C = self.shape(key)
        want = (-(-R // br), -(-C // bc))
        scale_key = key + SCALE_SUFFIX
        if self.shape(scale_key) != want:
            raise ValueError(
                f"{scale_key} has shape {self.shape(scale_key)}; a {R}x{C} weight in "
                f"{br}x{bc} blocks needs {want}"
            )
        w = self._read(key, (slice(r0, r1), slice(c0, c1)))
        s = self._read(scale_key, (slice(r0 // br, -(-r1 // br)), slice(c0 // bc, -(-c1 // bc))))
        return dequantize_fp8(w, s, self._block, key, offset=(r0, c0))


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
        (e0, e1), (r0, r1), _ = _bounds(index, self.shape)
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


def hf_blocks(path: str, n_layers: int) -> dict[str, HFBlocks]:
    """Our name -> reader, for the weights of the Hugging Face folder `path`."""
    folder = SafetensorsFolder(path)
    plan, _ = hf_weight_plan(folder.keys(), n_layers)
    return {name: HFBlocks(folder, recipe) for name, recipe in plan.items()}
