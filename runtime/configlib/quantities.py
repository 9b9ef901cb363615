"""Counts with a unit (`469B tokens`, `2K steps`) and the batch-size schedule that turns tokens
into optimizer steps.

Two field types read them:
  * `steps`: a plain integer is a step count (so every older file keeps its meaning); a string
    `N steps` is one too, and `N tokens` is resolved at load to the first step by which at least
    N tokens have been consumed, on the batch-size schedule the spec's `batch_schedule` names.
  * `tokens`: a token count; a plain integer is tokens, and so is `N tokens` or `N`.
N may have a decimal point and an SI suffix: K = 1e3, M = 1e6, B = 1e9, T = 1e12 (`14.3T`);
the count it names must be a whole number.

The batch-size schedule (`BatchRamp`) follows Megatron-LM's ramp, in tokens: the global batch
(sequences per optimizer step) starts at `start` and grows by `increment` in equal shares of
`rampup` tokens: with n = (full - start) / increment, a step that begins after c tokens uses
start + increment * floor(c * n / rampup) sequences, and `full` from c >= rampup on. Everything
is integer arithmetic, so a token count resolves to the same step on every machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

STEPS_TYPE = "steps"
TOKENS_TYPE = "tokens"
QUANTITY_TYPES = (STEPS_TYPE, TOKENS_TYPE)

TYPE_WORDS = {STEPS_TYPE: "step count", TOKENS_TYPE: "token count"}
"""The types in words, for messages."""

SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_QUANTITY = re.compile(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?)\s*([KMBT]?)\s*(tokens?|steps?)?\s*")
_NUMBER = r"\s*[0-9][0-9_,]*(\.[0-9]+)?\s*[KMBT]?\s*"
STEPS_SCHEMA_PATTERN = f"^{_NUMBER}(tokens?|steps?)\\s*$"
TOKENS_SCHEMA_PATTERN = f"^{_NUMBER}(tokens?)?\\s*$"
"""The JSON Schema's patterns of the strings a steps and a tokens field take."""
SYNTAX = "an integer or `N steps` / `N tokens` (N may have a suffix K, M, B or T: `469B tokens`)"
TOKENS_SYNTAX = "an integer or `N tokens` (N may have a suffix K, M, B or T: `469B tokens`)"


@dataclass(frozen=True)
class Quantity:
    """A count as written in a config: `amount` of `unit` ("steps" or "tokens")."""

    amount: int
    unit: str
    written: str

    def __str__(self) -> str:
        return self.written


def parse_quantity(text: str, field_type: str) -> Quantity | str:
    """The Quantity a string spells for a field of `field_type` (steps or tokens), or why not."""
    syntax = SYNTAX if field_type == STEPS_TYPE else TOKENS_SYNTAX
    match = _QUANTITY.fullmatch(text)
    if match is None:
        return f"expected {syntax}, found {text!r}"
    number, suffix, unit = match.groups()
    unit = (unit or "").rstrip("s") + "s" if unit else ""
    if not unit:
        if field_type == STEPS_TYPE:
            return f"{text!r} needs a unit: `{text.strip()} tokens` or `{text.strip()} steps`"
        unit = TOKENS_TYPE
    if field_type == TOKENS_TYPE and unit != TOKENS_TYPE:
        return f"expected {syntax}, found {text!r} (this field counts tokens)"
    exact = Fraction(number.replace("_", "").replace(",", "")) * SUFFIXES[suffix]
    if exact.denominator != 1:
        return f"{text!r} is not a whole number of {unit}"
    return Quantity(int(exact), unit, " ".join(text.split()))


def as_written(value: object) -> object:
    """A value with every Quantity in it (items of lists, values of mappings) back to the text
    it was written as: what a config file may hold again."""
    if isinstance(value, Quantity):
        return value.written
    if isinstance(value, list):
        return [as_written(item) for item in value]
    if isinstance(value, dict):
        return {key: as_written(item) for key, item in value.items()}
    return value


def format_count(n: int) -> str:
    """A count the way the paper writes it, exactly: 14.633T, 469B, 2K, 2.5K; otherwise with
    thousands separators (4,096)."""
    for suffix in ("T", "B", "M", "K"):
        scale = SUFFIXES[suffix]
        if n < scale:
            continue
        if n % (scale // 1000 if scale > 1000 else 100):  # more than three decimals: no suffix
            break
        text = f"{float(Fraction(n, scale)):.3f}".rstrip("0").rstrip(".")
        return f"{text}{suffix}"
    return f"{n:,}"


@dataclass(frozen=True)
class Stage:
    """A run of steps with one global batch size: from step `first_step`, which begins after
    `first_sample` sequences (`first_token` tokens) have been consumed."""

    first_step: int
    first_sample: int
    first_token: int
    batch: int  # sequences per optimizer step


class BatchRamp:
    """The global batch of every optimizer step (module doc); no ramp when `start` is None."""

    def __init__(
        self,
        *,
        seq_len: int,
        full: int,
        start: int | None = None,
        increment: int | None = None,
        rampup: int = 0,
    ) -> None:
        if seq_len < 1 or full < 1:
            raise ValueError(f"seq_len ({seq_len}) and the batch ({full}) must be positive")
        self.seq_len, self.full = seq_len, full
        self.start, self.increment, self.rampup = start, increment, rampup
        self.stages = self._stages()

    @property
    def ramps(self) -> bool:
        return len(self.stages) > 1

    def _stages(self) -> list[Stage]:
        start, increment, full, rampup = self.start, self.increment, self.full, self.rampup
        if start is None or start >= full or rampup <= 0:
            return [Stage(0, 0, 0, full)]
        increment = increment or full - start
        n = -(-(full - start) // increment)  # increments to full (the last one may be short)
        stages: list[Stage] = []
        step = sample = 0
        while True:
            tokens = sample * self.seq_len
            k = min(n, tokens * n // rampup)
            batch = min(full, start + k * increment) if k < n else full
            if stages and stages[-1].batch == batch:  # the same size again (a short last step)
                pass
            else:
                stages.append(Stage(step, sample, tokens, batch))
            if k >= n:
                return stages
            # steps of this batch until the tokens reach the next share: (c + m*b*L) * n >= (k+1) R
            need = (k + 1) * rampup - tokens * n
            per_step = batch * self.seq_len * n
            steps = max(1, -(-need // per_step))
            step += steps
            sample += steps * batch

    def stage(self, step: int) -> Stage:
        """The stage optimizer step `step` (0-based) is in."""
        found = self.stages[0]
        for stage in self.stages:
            if stage.first_step > step:
                break
            found = stage
        return found

    def batch(self, step: int) -> int:
        """Global batch (sequences) of optimizer step `step` (0-based)."""
        return self.stage(step).batch

    def samples_before(self, step: int) -> int:
        """Sequences consumed by steps 0 .. step - 1."""
        stage = self.stage(step)
        return stage.first_sample + (step - stage.first_step) * stage.batch

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by steps 0 .. step - 1."""
        return self.samples_before(step) * self.seq_len

    def step_at_tokens(self, tokens: int) -> int:
        """The first step count s with tokens_before(s) >= tokens: after s steps, at least
        `tokens` tokens have been trained on."""
        if tokens <= 0:
            return 0
        found = self.stages[0]  # the last stage that begins before `tokens`
        for stage in self.stages:
            if stage.first_token >= tokens:
                break
            found = stage
        per_step = found.batch * self.seq_len
        return found.first_step + -(-(tokens - found.first_token) // per_step)

    def describe(self) -> str:
        """The schedule in words: `batch 3,072 -> 15,360 over 469B tokens, seq_len 4,096`."""
        if not self.ramps:
            return f"batch {self.full:,}, seq_len {self.seq_len:,}"
        return (
            f"batch ramp {self.stages[0].batch:,} -> {self.full:,} over "
            f"{format_count(self.rampup)} tokens, seq_len {self.seq_len:,}"
        )
