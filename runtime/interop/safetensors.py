"""Safetensors folders read without loading them whole: a folder's files (model.safetensors, or the
shards model.safetensors.index.json names), each tensor's rows read with plain file reads, and
DeepSeek's released block-FP8 weights (float8_e4m3fn with a `weight_scale_inv` per 128x128 block,
edge blocks partial) dequantized to float32, a block at a time with only its own scales.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable

import torch
from torch import Tensor

from runtime.checkpoint.format import CheckpointError

SCALE_SUFFIX = "_scale_inv"


def slice_bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) per dim of `index` (unit-step slices) over a tensor of `shape`."""
    out = []
    for i, n in zip(index, shape):
        start, stop, step = i.indices(n)
        assert step == 1, index
        out.append((start, max(start, stop)))
    return out


def dequantize_fp8(
    w: Tensor,
    scale_inv: Tensor,
    block: tuple[int, int],
    name: str = "",
    offset: tuple[int, int] = (0, 0),
) -> Tensor:
    """DeepSeek's block FP8 -> float32: w (R, C) float8_e4m3fn, each br x bc block times its scale.
    w may be a block of a larger weight that starts at `offset` (r0, c0); scale_inv then holds the
    scales of the blocks it touches (rows r0 // br .. (r0 + R - 1) // br, likewise for columns).
    Edge blocks may be partial."""
    br, bc = block
    R, C = w.shape
    r0, c0 = offset
    want = (-(-(r0 + R) // br) - r0 // br, -(-(c0 + C) // bc) - c0 // bc)
    if tuple(scale_inv.shape) != want:
        whole = "" if offset == (0, 0) else f" at offset {offset}"
        raise ValueError(
            f"{name}_scale_inv has shape {tuple(scale_inv.shape)}; a {R}x{C} weight{whole} in "
            f"{br}x{bc} blocks needs {want}"
        )
    s = scale_inv.float().repeat_interleave(br, 0)[r0 % br : r0 % br + R]
    s = s.repeat_interleave(bc, 1)[:, c0 % bc : c0 % bc + C]
    return w.float() * s


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a folder: the shards model.safetensors.index.json names, or
    model.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        return ["model.safetensors"]
    with open(index) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def read_safetensors(folder: str, fp8_block: Callable[[], tuple[int, int]]) -> dict[str, Tensor]:
    """Every tensor of a folder (model.safetensors, or the shards model.safetensors.index.json
    names), FP8 weights dequantized with their `weight_scale_inv` to float32 in blocks of
    `fp8_block()` (read from config.json's quantization_config only when there are any)."""
    from safetensors.torch import load_file

    out: dict[str, Tensor] = {}
    for shard in safetensors_files(folder):
        out.update(load_file(os.path.join(folder, shard)))
    scales = [k for k in out if k.endswith(".weight_scale_inv")]
    if scales or any(t.dtype == torch.float8_e4m3fn for t in out.values()):
        block = fp8_block()
        for k in scales:
            w = k[: -len("_scale_inv")]
            if w not in out:
                raise KeyError(f"{folder}: {k} has no weight {w}")
            out[w] = dequantize_fp8(out[w], out.pop(k), block, w)
        left = [k for k, t in out.items() if t.dtype == torch.float8_e4m3fn]
        if left:
            raise KeyError(f"{folder}: FP8 weights without a weight_scale_inv: {left[:5]}")
    return out


MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


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
        spans = slice_bounds(index, shape)
        (r0, r1) = spans[0] if shape else (0, 1)
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
    model.safetensors.index.json names), read on demand (FP8 blocks of `fp8_block()`): `keys()` (the weights; FP8 scales are
    not keys of their own), `shape(key)`, `read(key, index)` -> float32 for FP8 weights."""

    def __init__(self, folder: str, fp8_block: Callable[[], tuple[int, int]]):
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
            self._block = fp8_block()
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
        (r0, r1), (c0, c1) = slice_bounds(index, self.shape(key))
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
