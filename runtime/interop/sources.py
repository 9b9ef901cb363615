"""Model sources: what a path holds, for init_from, export and sample.

`load_source(path)` recognises the path and returns a Source: the model section's fields (the
architecture), the weights under this model's names (read on first use: a run resolving its config
needs only the architecture) and the tokenizer (or None). Kinds, tried in order:

  checkpoint          a trainer checkpoint file (checksum and config hash verified, weights-only
                      unpickling, memory-mapped)
  sharded checkpoint  a DCP folder of an FSDP / expert-parallel run (runtime/checkpoint/dcp.py)
  hf                  a Hugging Face folder (config.json + safetensors) of a registered family

Opening a source checks its weights against its architecture (names from the headers or metadata,
shapes on the meta device), so a config.json that does not fit its weights is one CheckpointError
rather than an attempt to build the model it describes.

A new kind is one `register_source(SourceKind(...))`: a `recognises(path)` test and a
`load(path) -> Source`.

Every source belongs to a model family (its ModelSpec, runtime/models/spec.py): a Hugging Face
folder by its config.json model_type, a checkpoint of this trainer to the default family. Three
uses, all reading a weight (or a block of one) at a time: `build_model()` (sample) builds the
architecture the weights hold (runtime/models/build.py), leaving out MTP modules that have no
weights (a folder saved by transformers has none); `tensors()` (export) streams that
architecture's weights; and `load_weights(model)` (init_from) fills a model the trainer built,
whole or sharded, reading only the block of each weight this process holds (weight_blocks.py; a
sharded folder through DCP), and MTP modules without weights keep their fresh initialisation, to
be trained.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from generated import PATH
from generated.config import DistributedConfig, ModelConfig, MoETrainingConfig
from generated.names import Dataset as DatasetChoice
from generated.parser import config_from_dict
from runtime.checkpoint.dcp import (
    is_sharded_checkpoint,
    load_full,
    load_meta,
    load_model_into,
    model_tensors,
)
from runtime.checkpoint.format import CheckpointError, check_weights_fit
from runtime.checkpoint.single_file import load_checkpoint
from runtime.components.tokenizer import TOKENIZER_FILE, TextCodec
from runtime.distributed.utils import local_block
from runtime.interop.safetensors import read_safetensors
from runtime.interop.weight_blocks import hf_blocks
from runtime.models import ModelSpec, get_model_spec, spec_for_hf
from runtime.models.build import build_model

# export reads a stack of experts this many bytes at a time (a sharded folder: only the saved
# shards that hold them); the rest of the model, one tensor at a time
EXPORT_PIECE_BYTES = 512 << 20
MTP_DEPTH = PATH.model.mtp_depth.rsplit(".", 1)[-1]
N_LAYERS = PATH.model.n_layers.rsplit(".", 1)[-1]


class UnknownSource(CheckpointError):
    """A path that no source kind recognises."""


@dataclass
class Source:
    kind: str  # the SourceKind's name
    path: str
    spec: ModelSpec  # the model family
    model_fields: dict[str, object]  # spec model field name -> value (missing: spec default)
    read_weights: Callable[[], dict[str, Tensor]]  # the state dict, under this model's names
    tokenizer: TextCodec | None = None
    # a folder holding the tokenizer as tokenizer.json (+ tokenizer_config.json): what
    # data.tokenizer can name; None when the source has none of its own in that form
    tokenizer_path: str | None = None
    # name -> block reader (runtime/interop/weight_blocks.py) for loading a block at a time; default: weights()
    read_blocks: Callable[[], Mapping[str, Any]] | None = None
    # loads the weights into a model itself (a sharded DCP folder: DCP reads each process's shards)
    load_into: Callable[[nn.Module], None] | None = None
    moe: MoETrainingConfig | None = None  # the routing settings the weights trained with
    config_file: str = ""  # where the architecture was read (config.json, or the checkpoint)
    _weights: dict[str, Tensor] | None = field(default=None, repr=False)
    _blocks: Mapping[str, Any] | None = field(default=None, repr=False)

    def weights(self) -> dict[str, Tensor]:
        if self._weights is None:
            self._weights = self.read_weights()
        return self._weights

    def blocks(self) -> Mapping[str, Any]:
        """name -> the whole weight's `.shape` and `[index]` -> a block of it, read on demand."""
        if self._blocks is None:
            self._blocks = self.weights() if self.read_blocks is None else self.read_blocks()
        return self._blocks

    def mtp_modules_with_weights(self) -> set[int]:
        return {int(k.split(".")[1]) for k in self.blocks() if k.startswith("mtp.")}

    def model_config(self) -> ModelConfig:
        """The architecture the weights hold: MTP modules without weights are left out (with a
        warning)."""
        return self._architecture(warn=True)

    def _architecture(self, warn: bool) -> ModelConfig:
        fields = dict(self.model_fields)
        depth = int(fields.get(MTP_DEPTH, ModelConfig().mtp_depth))  # type: ignore[call-overload]
        present = len(self.mtp_modules_with_weights())
        if depth > present:
            if warn:
                warnings.warn(
                    f"{self.path}: config says {depth} MTP modules but the weights hold {present}; "
                    f"using {present}",
                    stacklevel=4,
                )
            fields[MTP_DEPTH] = present
        return ModelConfig(**fields)  # type: ignore[arg-type]

    def check_fits(self) -> None:
        """CheckpointError unless the weights' names and shapes are those of the architecture the
        fields describe (MTP modules without weights aside), checked on the meta device: a
        config.json that does not fit its weights (a vocab_size of 3e8 over 256 rows, a million
        layers over two) is refused before anything builds it. load_source calls it."""
        try:
            every = self.blocks()
        except KeyError as error:  # a name this architecture has no place for
            raise CheckpointError(f"cannot load the weights of {self.path}: {error}") from None
        cfg = self._architecture(warn=False)  # users of the source warn about missing MTP
        blocks = {k: v for k, v in every.items() if self._kept(k, cfg)}
        layers = {int(k.split(".")[1]) for k in blocks if k.startswith("layers.")}
        if layers != set(range(cfg.n_layers)):  # before building n_layers modules, even on meta
            raise CheckpointError(
                f"{self.config_file or self.path}: the model has {cfg.n_layers} layers "
                f"({N_LAYERS}) but the weights of {self.path} hold {len(layers)}"
            )
        with torch.device("meta"):
            check_weights_fit(self.spec.build(cfg, self.moe), blocks, self.path)

    @staticmethod
    def _kept(name: str, cfg: ModelConfig) -> bool:
        return not (name.startswith("mtp.") and int(name.split(".")[1]) >= cfg.mtp_depth)

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model the weights describe (model_config()) in this one process, in eval mode,
        filled a weight at a time (load_weights): the model plus one weight in memory, never a
        second copy of the model."""
        model, _ = build_model(
            self.spec,
            self.model_config(),
            self.moe,
            DistributedConfig(),
            1,
            torch.device(device),
            self.load_weights,
        )
        return model.eval()

    def tensors(self) -> tuple[ModelConfig, Iterator[tuple[str, Tensor]]]:
        """(model_config(), its weights as (name, whole tensor) pairs read one at a time), names and
        shapes checked against that architecture first (export: never the whole model at once)."""
        cfg = self.model_config()  # load_source checked that the weights fit it
        blocks = {k: v for k, v in self.blocks().items() if self._kept(k, cfg)}

        def read() -> Iterator[tuple[str, Tensor]]:
            for name, reader in blocks.items():
                whole = [slice(None) for _ in reader.shape]
                if not self.spec.adapter.is_stacked_experts(name):
                    yield name, reader[tuple(whole)]
                    continue
                # a stack of experts (~30 GB a layer in float32 at DeepSeek-V3's size) in pieces
                expert_bytes = 4 * math.prod(reader.shape[1:])  # float32 at most
                step = max(1, EXPORT_PIECE_BYTES // max(1, expert_bytes))
                for first in range(0, reader.shape[0], step):
                    yield name, reader[(slice(first, first + step), *whole[1:])]

        return cfg, read()

    def load_weights(self, model: nn.Module) -> None:
        """Copy the weights into `model` (same architecture), whole or sharded by FSDP2 / expert
        parallelism: each process reads and copies only the block of each weight it holds, one
        weight at a time. MTP modules the source has no weights for keep theirs (with a warning).
        CheckpointError naming the first misfit otherwise."""
        if self.load_into is not None:
            self.load_into(model)
            return
        try:
            self._copy_blocks(model)
        except (KeyError, ValueError) as error:  # names or scales that do not fit, named
            raise CheckpointError(f"cannot load the weights of {self.path}: {error}") from None

    def _copy_blocks(self, model: nn.Module) -> None:
        own = model.state_dict(keep_vars=True)
        wanted = {k.split(".")[1] for k in own if k.startswith("mtp.")}
        # a model built with fewer MTP modules than the source holds takes the first ones
        blocks = {
            k: v
            for k, v in self.blocks().items()
            if not k.startswith("mtp.") or k.split(".")[1] in wanted
        }
        if getattr(model, "pipeline_part", False):  # a pipeline stage's process: its weights
            blocks = {k: v for k, v in blocks.items() if k in own}
        absent = sorted(wanted - {str(m) for m in self.mtp_modules_with_weights()})
        if absent:
            warnings.warn(
                f"{self.path} has no weights for MTP module(s) {absent}; they keep their init",
                stacklevel=3,
            )
        keep = {k: v for k, v in own.items() if k.startswith("mtp.") and k.split(".")[1] in absent}
        check_weights_fit(model, {**keep, **blocks}, self.path)
        with torch.no_grad():
            for name, target in own.items():
                if name in keep:
                    continue
                local, shape, offset = local_block(target)
                if local.numel():
                    local.copy_(blocks[name][tuple(slice(o, o + n) for o, n in zip(offset, shape))])


@dataclass(frozen=True)
class SourceKind:
    name: str
    recognises: Callable[[str], bool]
    load: Callable[[str], Source]
    what: str  # for the error naming what a path may be


SOURCE_KINDS: list[SourceKind] = []


def register_source(kind: SourceKind, first: bool = False) -> SourceKind:
    """Add a kind; `first` tries it before the others (for a more specific test)."""
    SOURCE_KINDS.insert(0, kind) if first else SOURCE_KINDS.append(kind)
    return kind


def load_source(path: str) -> Source:
    """The Source at `path`, its weights checked to fit its architecture (names and shapes, from
    headers and metadata); UnknownSource if no kind recognises it. Reading errors: CheckpointError
    (a damaged or foreign checkpoint, weights that do not fit), ValueError (an unsupported Hugging
    Face setting, named)."""
    for kind in SOURCE_KINDS:
        if kind.recognises(path):
            source = kind.load(path)
            source.check_fits()
            return source
    kinds = ", ".join(k.what for k in SOURCE_KINDS)
    raise UnknownSource(f"{path!r} is none of: {kinds}")


# ----------------------------------------------------------------------------- checkpoint file


def _checkpoint_source(path: str, state: dict, **readers: Any) -> Source:
    config = config_from_dict(state["config"])
    codec: TextCodec | None
    if state.get("tokenizer"):
        codec = TextCodec.from_state(state["tokenizer"])
    else:  # older checkpoints of a text corpus: bytes
        codec = TextCodec.bytes() if config.data.dataset != DatasetChoice.BIN else None
    return Source(
        kind="checkpoint",
        path=path,
        spec=get_model_spec(),
        model_fields=dict(state["config"]["model"]),
        tokenizer=codec,
        moe=config.moe,
        config_file=path,
        **readers,
    )


def _load_checkpoint_file(path: str) -> Source:
    # verifies the checksum and the config hash first; memory-mapped: a tensor's pages are read
    # when used (init_from into a sharded model reads only this process's blocks)
    state = load_checkpoint(path, mmap=True)
    return _checkpoint_source(path, state, read_weights=lambda: state["model"])


register_source(
    SourceKind("checkpoint", os.path.isfile, _load_checkpoint_file, "a trainer checkpoint file")
)


def _load_sharded_checkpoint(path: str) -> Source:
    # a sharded folder (FSDP / expert parallel runs): sample gathers its full weights in this one
    # process, export reads them a tensor at a time, and init_from lets DCP read each process's
    # shards (runtime/checkpoint/dcp.py)
    return _checkpoint_source(
        path,
        load_meta(path),  # verifies every file's checksum and the config hash first
        read_weights=lambda: load_full(path)["model"],
        read_blocks=lambda: model_tensors(path),
        load_into=lambda model: load_model_into(model, path),
    )


register_source(
    SourceKind(
        "sharded checkpoint",
        is_sharded_checkpoint,
        _load_sharded_checkpoint,
        "a sharded checkpoint folder",
    )
)


# ----------------------------------------------------------------------------- Hugging Face folder


def _is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _load_hf_folder(path: str) -> Source:
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config_json = json.load(f)
    # an unknown model_type goes to the default family, whose adapter names the unsupported key
    spec = spec_for_hf(config_json.get("model_type")) or get_model_spec()
    adapter = spec.adapter
    fields = adapter.model_fields_from_hf_config(config_json, config_path)
    n_layers = int(fields.get(N_LAYERS, ModelConfig().n_layers))  # type: ignore[call-overload]

    def fp8_block() -> tuple[int, int]:
        return adapter.fp8_block(config_json, config_path)

    return Source(
        kind="hf",
        path=path,
        spec=spec,
        model_fields=fields,
        read_weights=lambda: adapter.from_hf_state_dict(
            read_safetensors(path, fp8_block), n_layers
        ),
        read_blocks=lambda: hf_blocks(path, n_layers, adapter, fp8_block),
        tokenizer=TextCodec.from_folder(path),
        tokenizer_path=path if os.path.isfile(os.path.join(path, TOKENIZER_FILE)) else None,
        config_file=config_path,
    )


register_source(
    SourceKind(
        "hf",
        _is_hf_folder,
        _load_hf_folder,
        "a Hugging Face folder (config.json + safetensors)",
    )
)
