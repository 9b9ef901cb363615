"""Tokenizers: `bytes` (UTF-8 bytes, id = byte value), `bpe` (a byte-level BPE trained with
Hugging Face `tokenizers`) and `pretrained` (a released model's tokenizer, read from its Hugging
Face folder or tokenizer.json, with its bos / eos / pad ids), all as a `tokenizers.Tokenizer`, so
that one code path encodes, decodes, saves `tokenizer.json` and exports a folder
`AutoTokenizer.from_pretrained` loads with the same ids.

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
PRETRAINED = "pretrained"  # a tokenizer read from a file, not made by this trainer
KINDS = (*(str(k) for k in TokenizerKind), PRETRAINED)
SPECIAL = ("bos", "eos", "pad")


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


class TokenizerError(ValueError):
    """A tokenizer that cannot be read or does not fit (the message names the file)."""


class TextCodec:
    """A `tokenizers.Tokenizer`, its kind (`bytes`, `bpe` or `pretrained`) and its special token
    ids (None where it has none; byte and BPE tokenizers of this trainer have none)."""

    def __init__(
        self,
        kind: str,
        tokenizer: Any,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.tokenizer = str(kind), tokenizer  # plain str: checkpoints hold no enums
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

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
    def from_json(cls, kind: str, text: str, **special: int | None) -> TextCodec:
        from tokenizers import Tokenizer

        return cls(kind, Tokenizer.from_str(text), **special)

    @classmethod
    def from_path(cls, path: str) -> TextCodec:
        """A released tokenizer: a Hugging Face folder holding tokenizer.json, or a tokenizer.json
        file, with the bos / eos / pad tokens its tokenizer_config.json names (beside it), else
        the ids config.json / generation_config.json give. TokenizerError naming the path."""
        folder, file = (
            (path, os.path.join(path, TOKENIZER_FILE))
            if os.path.isdir(path)
            else (os.path.dirname(path), path)
        )
        if not os.path.isfile(file):
            raise TokenizerError(
                f"{path}: no {TOKENIZER_FILE} (a tokenizer is a Hugging Face folder holding one, or the file itself)"
            )
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
            codec = cls.from_json(PRETRAINED, text)
        except Exception as error:  # noqa: BLE001 - the tokenizers library's errors, named
            first = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            raise TokenizerError(f"{file}: not a tokenizers tokenizer.json ({first})") from None
        config = _read_json(os.path.join(folder, HF_CONFIG_FILE))
        codec.kind = config.get("deepseek_moe_tokenizer", PRETRAINED)
        if codec.kind not in KINDS:
            codec.kind = PRETRAINED
        ids = {
            **_read_json(os.path.join(folder, "config.json")),
            **_read_json(os.path.join(folder, "generation_config.json")),
        }
        for name in SPECIAL:
            token = config.get(f"{name}_token")
            content = token.get("content") if isinstance(token, dict) else token
            found = codec.tokenizer.token_to_id(content) if isinstance(content, str) else None
            if found is None and isinstance(ids.get(f"{name}_token_id"), int):
                found = ids[f"{name}_token_id"]
            setattr(codec, f"{name}_id", found)
        return codec

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        """Ids it can produce: the vocabulary with the added (special) tokens."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def special_ids(self) -> dict[str, int | None]:
        return {f"{name}_id": getattr(self, f"{name}_id") for name in SPECIAL}

    def same_ids_as(self, other: TextCodec) -> bool:
        """Whether both map every token to the same id (and have the same special ids)."""
        return (
            self.tokenizer.get_vocab(with_added_tokens=True)
            == other.tokenizer.get_vocab(with_added_tokens=True)
            and self.special_ids() == other.special_ids()
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

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
        """What a checkpoint stores (plain strings and ints, loadable with weights_only)."""
        return {"kind": self.kind, "json": self.to_json(), **self.special_ids()}

    @classmethod
    def from_state(cls, state: dict) -> TextCodec:
        special = {f"{name}_id": state.get(f"{name}_id") for name in SPECIAL}
        return cls.from_json(state["kind"], state["json"], **special)

    def save(self, path: str) -> None:
        atomic_write_bytes(path, self.to_json().encode())

    def hf_config(self, model_max_length: int | None = None) -> dict[str, Any]:
        """tokenizer_config.json: the class transformers builds, the special tokens by content."""
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "deepseek_moe_tokenizer": self.kind,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        for name in SPECIAL:
            index = getattr(self, f"{name}_id")
            if index is not None:
                config[f"{name}_token"] = self.tokenizer.id_to_token(index)
        return config

    def save_hf(self, folder: str, model_max_length: int | None = None) -> None:
        """tokenizer.json + tokenizer_config.json: AutoTokenizer.from_pretrained(folder) loads it
        with the same ids and special tokens."""
        self.save(os.path.join(folder, TOKENIZER_FILE))
        text = json.dumps(self.hf_config(model_max_length), indent=2) + "\n"
        atomic_write_bytes(os.path.join(folder, HF_CONFIG_FILE), text.encode())

    @classmethod
    def from_folder(cls, folder: str) -> TextCodec:
        """The tokenizer of an exported or released folder; a folder without tokenizer.json is
        bytes (what this trainer's byte runs exported before they wrote one)."""
        if not os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
            return cls.bytes()
        return cls.from_path(folder)


def _read_json(path: str) -> dict[str, Any]:
    """A JSON object file, or {} when it is missing or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def decode(codec: TextCodec | None, ids: list[int]) -> str:
    """Text of token ids with the model's tokenizer; space-separated ids without one (a
    pre-tokenized corpus)."""
    return codec.decode(ids) if codec is not None else " ".join(str(int(t)) for t in ids)
