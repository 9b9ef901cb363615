"""Tokenizers: `bytes` (UTF-8 bytes, id = byte value) and `bpe` (a byte-level BPE trained with
Hugging Face `tokenizers`), both as a `tokenizers.Tokenizer`, so that one code path encodes,
decodes, saves `tokenizer.json` and exports a folder `AutoTokenizer.from_pretrained` loads.

The byte tokenizer is a BPE model with no merges whose vocabulary maps GPT-2's byte-to-character
table back to the byte values: any text round-trips, and ids are exactly the bytes the byte corpora
hold. In a byte-level vocabulary every character of a token stands for one byte, which gives each
token's length in bytes (for bits per byte).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from generated import PATH
from generated.names import Tokenizer as TokenizerKind
from runtime.utils.files import atomic_write_bytes

TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
KINDS = tuple(TokenizerKind)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel pre-tokenizers use)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_level(tokenizer: Any, use_regex: bool) -> Any:
    from tokenizers import decoders, pre_tokenizers

    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class TextCodec:
    """A `tokenizers.Tokenizer` and its kind (`bytes` or `bpe`)."""

    def __init__(self, kind: str, tokenizer: Any) -> None:
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.tokenizer = (
            TokenizerKind(kind).value,
            tokenizer,
        )  # plain str: checkpoints hold no enums

    @classmethod
    def bytes(cls) -> TextCodec:
        from tokenizers import Tokenizer, models

        table = bytes_to_unicode()
        model = models.BPE(vocab={table[b]: b for b in range(256)}, merges=[])
        return cls(TokenizerKind.BYTES, _byte_level(Tokenizer(model), use_regex=False))

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> TextCodec:
        """A byte-level BPE of at most `vocab_size` tokens trained on the strings of `texts`."""
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        if vocab_size < 256:
            raise ValueError(
                f"a byte-level BPE needs {PATH.model.vocab_size} >= 256 (one token per byte), got {vocab_size}"
            )
        tokenizer = _byte_level(Tokenizer(models.BPE()), use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(TokenizerKind.BPE, tokenizer)

    @classmethod
    def from_json(cls, kind: str, text: str) -> TextCodec:
        from tokenizers import Tokenizer

        return cls(kind, Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def token_bytes(self) -> np.ndarray:
        """(vocab,) length in bytes of each token."""
        vocab = self.tokenizer.get_vocab()
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, index in vocab.items():
            lengths[index] = len(token)
        return lengths

    def state(self) -> dict:
        """What a checkpoint stores (plain strings, loadable with weights_only)."""
        return {"kind": self.kind, "json": self.to_json()}

    @classmethod
    def from_state(cls, state: dict) -> TextCodec:
        return cls.from_json(state["kind"], state["json"])

    def save(self, path: str) -> None:
        atomic_write_bytes(path, self.to_json().encode())

    def save_hf(self, folder: str, model_max_length: int) -> None:
        """tokenizer.json + tokenizer_config.json: AutoTokenizer.from_pretrained(folder) loads it.
        No special tokens (the model was trained without any)."""
        self.save(os.path.join(folder, TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "deepseek_moe_tokenizer": self.kind,
        }
        with open(os.path.join(folder, HF_CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    @classmethod
    def from_folder(cls, folder: str) -> TextCodec:
        """The tokenizer of an exported folder; a folder without tokenizer.json is bytes."""
        path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(path):
            return cls.bytes()
        kind = TokenizerKind.BPE
        config_path = os.path.join(folder, HF_CONFIG_FILE)
        if os.path.isfile(config_path):
            with open(config_path) as f:
                kind = json.load(f).get("deepseek_moe_tokenizer", TokenizerKind.BPE)
        with open(path, encoding="utf-8") as f:
            return cls.from_json(kind, f.read())


def decode(codec: TextCodec | None, ids: list[int]) -> str:
    """Text of token ids with the model's tokenizer; space-separated ids without one (a
    pre-tokenized corpus)."""
    return codec.decode(ids) if codec is not None else " ".join(str(int(t)) for t in ids)
