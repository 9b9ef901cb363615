"""The data of one process: the training and validation sets of the `data` section, their
loaders, the tokenizer that reads and writes the run's text, and the data position (Stateful).

Two kinds of data (see corpus.py and mixture.py):
  * `data.sources` empty: the `dataset` corpus, one token stream (stdlib / text_dir as bytes or
    the run's BPE, or a `bin` file), windows at offsets drawn per sample, validation its tail;
  * `data.sources`: a weighted mixture of prepared folders and Megatron prefixes, each window read
    once per epoch of its source, validation held-out whole documents (`data.validation`, or each
    source's own).
Either way every window is a pure function of (seed, sample id), and the sample ids of a step a
function of the step (sampling.py's BatchPlan), so the position is the step.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from generated import PATH
from generated.config import DataConfig
from generated.names import Tokenizer as TokenizerKind
from runtime.components.data.corpus import (
    TRAIN_STREAM,
    VAL_STREAM,
    WindowDataset,
    load_corpus,
    split_ranges,
)
from runtime.components.data.errors import DataError
from runtime.components.data.mixture import MixtureDataset, ValidationDataset
from runtime.components.data.sampling import BatchPlan, EvalBatchSampler, StepBatchSampler
from runtime.components.data.sources import (
    SourceError,
    TokenSource,
    check_ids,
    hold_out_tail,
    open_source,
)
from runtime.components.tokenizer import TextCodec, TokenizerError
from runtime.configlib.quantities import BatchRamp


def run_codec(data: DataConfig) -> TextCodec | None:
    """The tokenizer `data.tokenizer` names for a mixture: bytes, or a released one read from a
    path (TokenizerError naming it). `bpe` trains on a byte corpus, never on a mixture."""
    if data.tokenizer == TokenizerKind.BYTES:
        return TextCodec.bytes()
    return TextCodec.from_path(data.tokenizer)


class DataModule:
    """The data of one process (module doc). `window`: tokens per sample (seq_len + 1 +
    mtp_depth); `stride`: tokens between the starts of a source's windows (seq_len); `ramp`: the
    global batch of each step (None: `batch_size` * `grad_accum` throughout)."""

    def __init__(
        self,
        data: DataConfig,
        *,
        seed: int,
        window: int,
        batch_size: int,
        grad_accum: int,
        world_size: int = 1,
        rank: int = 0,
        vocab_size: int | None = None,
        stride: int | None = None,
        ramp: BatchRamp | None = None,
    ) -> None:
        self.data = data
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.num_workers, self.pin_memory = data.num_workers, data.pin_memory
        ramp = ramp or BatchRamp(seq_len=stride or window - 1, full=batch_size * grad_accum)
        self.plan = BatchPlan(
            ramp,
            batch_size=batch_size,
            world_size=world_size,
            rank=rank,
            skip_steps=data.skip_steps,
        )
        self.next_step = 0  # the data position: the next optimizer step's batches come next
        self.train_set: Dataset[Tensor]
        self.val_set: Dataset[Tensor]
        self.sources: list[TokenSource] = []
        if data.sources:
            self._open_mixture(seed, window, stride or window - 1, vocab_size)
        else:
            self._open_corpus(seed, window, vocab_size)
        if self.codec is not None and vocab_size is not None and self.codec.vocab_size > vocab_size:
            raise DataError(
                f"the tokenizer ({PATH.data.tokenizer}: {data.tokenizer}) has {self.codec.vocab_size:,} "
                f"ids, more than the model's vocabulary of {vocab_size:,} ({PATH.model.vocab_size})"
            )
        if data.document_mask and self.eos_id is None:
            raise DataError(
                f"{PATH.data.document_mask} needs an end-of-sequence token between documents, "
                f"and this run's tokenizer ({data.tokenizer}) has none"
            )

    def _open_corpus(self, seed: int, window: int, vocab_size: int | None) -> None:
        corpus = load_corpus(self.data, vocab_size)
        self.corpus = corpus
        (train_start, train_end), (val_start, val_end) = split_ranges(corpus.length, self.data)
        self.train_set = WindowDataset(corpus, train_start, train_end, window, seed, TRAIN_STREAM)
        self.val_set = WindowDataset(corpus, val_start, val_end, window, seed, VAL_STREAM)
        # text <-> tokens for the sample, the checkpoint and export; None for a pre-tokenized .bin
        self.codec: TextCodec | None = corpus.codec or (
            TextCodec.bytes() if corpus.is_bytes else None
        )
        self.bytes_per_token = corpus.bytes_per_token  # None: unknown (a .bin corpus)
        self.eos_id: int | None = None  # byte and BPE streams have no document ends

    def _open_mixture(self, seed: int, window: int, stride: int, vocab_size: int | None) -> None:
        data = self.data
        try:
            self.codec = run_codec(data)
            self.sources = [open_source(s.path) for s in data.sources]
            validation = open_source(data.validation) if data.validation is not None else None
            for source in self.sources + ([validation] if validation else []):
                self._check_tokenizer(source)
                if vocab_size is not None:
                    check_ids(source, vocab_size, data.data_dir)
            if validation is None:
                for source in self.sources:
                    hold_out_tail(source, data.val_split)
        except (SourceError, TokenizerError) as error:
            raise DataError(str(error)) from None
        for source in self.sources:
            if source.train.cut(window, stride) == 0:
                raise DataError(
                    f"{source.path}: {source.train.tokens:,} training tokens, fewer than one "
                    f"window of {window}"
                )
        if validation is not None:
            val_parts, val_weights = [validation.train], [1.0]
            if validation.val is not None:  # a prepared folder: all of it validates
                val_parts.append(validation.val)
                val_weights.append(validation.val.tokens / max(1, validation.train.tokens))
        else:
            val_parts = [s.val for s in self.sources if s.val is not None]
            val_weights = [
                w.weight for w, s in zip(data.sources, self.sources) if s.val is not None
            ]
        for part in val_parts:
            if part.cut(window, stride) == 0:
                raise DataError(
                    f"validation: {part.tokens:,} held-out tokens of {part.shards[0].prefix}, "
                    f"fewer than one window of {window}"
                )
        self.train_set = MixtureDataset(self.sources, [s.weight for s in data.sources], seed)
        self.val_set = ValidationDataset(val_parts, val_weights)
        known = [s.bytes_per_token for s in self.sources]
        self.bytes_per_token = known[0] if len(set(known)) == 1 and known[0] else None
        eos = {s.eos_id for s in self.sources if s.eos_id is not None}
        if self.codec is not None and self.codec.eos_id is not None:
            eos.add(self.codec.eos_id)
        if len(eos) > 1:
            raise DataError(
                f"the sources end their documents with different tokens: ids {sorted(eos)}"
            )
        self.eos_id = next(iter(eos), None)

    def _check_tokenizer(self, source: TokenSource) -> None:
        """A prepared source must have been tokenized by the run's tokenizer."""
        if source.tokenizer_file is None or self.codec is None:
            return
        prepared = TextCodec.from_path(source.tokenizer_file)
        if not prepared.same_ids_as(self.codec):
            raise DataError(
                f"{source.path} was prepared with another tokenizer ({source.tokenizer_file}) than "
                f"this run's ({PATH.data.tokenizer}: {self.data.tokenizer}); set "
                f"{PATH.data.tokenizer}: {source.path} or prepare it again"
            )

    # ---- loaders

    def _loader(
        self, dataset: Dataset[Tensor], batch_sampler: Sampler[list[int]]
    ) -> DataLoader[Tensor]:
        # Windows depend only on their sample ids; the loader's own generator keeps it from drawing
        # its base seed from (and so shifting) the global torch RNG.
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(0),
        )

    def train_loader(self, start_step: int, end_step: int) -> DataLoader[Tensor]:
        """Micro-batches (B, window) of steps start_step..end_step-1, plan.micro_per_rank(step)
        per step."""
        return self._loader(self.train_set, StepBatchSampler(self.plan, start_step, end_step))

    def val_loader(self, eval_iters: int, even: bool = False) -> DataLoader[Tensor]:
        """This process's validation batches; the first `loader.batch_sampler.counted` count
        (EvalBatchSampler: `even` pads every process to the same number of forwards)."""
        sampler = EvalBatchSampler(
            batch_size=self.batch_size,
            eval_iters=eval_iters,
            world_size=self.world_size,
            rank=self.rank,
            even=even,
        )
        return self._loader(self.val_set, sampler)

    def train_steps(self, end_step: int) -> Iterator[list[Tensor]]:
        """This process's micro-batches (a list of plan.micro_per_rank(step)) of each optimizer
        step from next_step to end_step - 1; next_step advances as each step's batches are handed
        out."""
        loader = iter(self.train_loader(self.next_step, end_step))
        while self.next_step < end_step:
            micro = [next(loader) for _ in range(self.plan.micro_per_rank(self.next_step))]
            self.next_step += 1
            yield micro

    def for_rank(self, rank: int) -> DataModule:
        """The same data as process `rank` reads it (the datasets are shared)."""
        other = copy.copy(self)
        other.rank, other.plan = rank, self.plan.for_rank(rank)
        return other

    def prompt_tokens(self, n: int) -> list[int]:
        """The first `n` validation tokens: the sample's prompt when there is no text tokenizer."""
        if isinstance(self.val_set, WindowDataset):
            start = self.val_set.start
            return [int(t) for t in self.val_set.corpus.array()[start : start + n]]
        return [int(t) for t in self.val_set[0][:n]]

    def source_stats(self, step: int) -> dict[str, float]:
        """Per mixture source after `step` optimizer steps: tokens trained on and epochs (a pure
        function of the step: windows are assigned by sample id; skipped batches not counted)."""
        if not isinstance(self.train_set, MixtureDataset):
            return {}
        seen = [0] * len(self.sources)
        for run in self.plan.trained_ids(step):
            before, after = self.train_set.seen(run.start), self.train_set.seen(run.stop)
            seen = [n + b - a for n, a, b in zip(seen, before, after)]
        names = [source.name for source in self.sources]
        out: dict[str, float] = {}
        for i, (source, samples) in enumerate(zip(self.sources, seen)):
            name = names[i] if names.count(names[i]) == 1 else f"{names[i]}#{i}"
            out[f"data/{name}/tokens"] = samples * source.train.stride
            out[f"data/{name}/epochs"] = samples / source.train.n_windows
        return out

    # Stateful: the data position is the next step (windows are a function of the step)
    def state_dict(self) -> dict[str, int]:
        return {"next_step": int(self.next_step)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.next_step = int(state["next_step"])
