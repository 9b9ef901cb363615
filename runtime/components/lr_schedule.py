"""Learning-rate schedules: a pure function of the optimizer step.

`lr_at(step, schedule, peak_lr)` is the lr used by optimizer step `step` (0-based: the first
update uses lr_at(0)). Every type starts with a linear warm-up from 0 (step 0) to `peak_lr`
(step `warmup_iters`); `decay_lr: false` keeps `peak_lr` after warm-up whatever the type. After
warm-up, each type is a registered function of (step, schedule, peak_lr), see the spec doc of
`schedule.schedule_type`. Past `lr_decay_iters` every decaying type stays at `min_lr`; `constant`
has no decay and stays at `peak_lr` for ever. `piecewise` ignores `lr_decay_iters` and `min_lr`:
it follows `segments` and holds the last segment's lr after it.
"""

import bisect
import math
from typing import Any

from generated import PATH
from generated.config import LRScheduleConfig, LRSegment
from generated.names import ScheduleType, Shape
from runtime.utils.registry import SCHEDULES

INITIAL_PHASE = "initial"
NO_DECAY = (ScheduleType.CONSTANT, ScheduleType.PIECEWISE)
"""Types that never read `lr_decay_iters`."""


def schedule_warnings(schedule: LRScheduleConfig, max_iters: int) -> list[str]:
    """Plain-text warnings for a (resolved) schedule that does not fit a run of `max_iters` steps."""
    if max_iters == 0:
        return []
    out = []
    warmup, end = schedule.warmup_iters, decay_end(schedule)
    if warmup >= max_iters:
        out.append(
            f"{PATH.schedule.warmup_iters} ({warmup}) >= {PATH.training.max_iters} ({max_iters}): the run "
            f"never leaves warm-up and never reaches {PATH.optimizer.lr}"
        )
    if schedule.schedule_type == ScheduleType.PIECEWISE:  # lr_decay_iters means nothing to it
        last = schedule.segments[-1].until if schedule.segments else 0
        if last > max_iters and warmup < max_iters:
            out.append(
                f"{PATH.schedule.segments}[{len(schedule.segments) - 1}].until ({last}) > "
                f"{PATH.training.max_iters} ({max_iters}): the run ends before the schedule does"
            )
        return out
    decays = schedule.decay_lr and schedule.schedule_type not in NO_DECAY
    if decays and end < max_iters:
        out.append(
            f"{PATH.schedule.lr_decay_iters} ({end}) < {PATH.training.max_iters} ({max_iters}): the last "
            f"{max_iters - end} steps run at min_lr (null follows max_iters)"
        )
    elif decays and end > max_iters and warmup < max_iters:
        out.append(
            f"{PATH.schedule.lr_decay_iters} ({end}) > {PATH.training.max_iters} ({max_iters}): the run "
            f"ends before the decay reaches min_lr (null follows max_iters)"
        )
    return out


def decay_end(schedule: LRScheduleConfig) -> int:
    """`lr_decay_iters`, which resolving the config fills in (a derived default)."""
    if schedule.lr_decay_iters is None:
        raise ValueError(
            f"{PATH.schedule.lr_decay_iters} is null: resolve the config first (it is a derived default)"
        )
    return schedule.lr_decay_iters


def lr_at(step: int, schedule: LRScheduleConfig, peak_lr: float) -> float:
    """Learning rate of optimizer step `step` under `schedule` (a LRScheduleConfig, resolved)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    decay_end(schedule)  # a schedule built in code must be resolved first
    warmup = schedule.warmup_iters
    if step < warmup:
        return peak_lr * step / warmup
    if not schedule.decay_lr:
        return peak_lr
    return SCHEDULES.get(schedule.schedule_type)(step, schedule, peak_lr)


def phase_at(step: int, schedule: LRScheduleConfig) -> str:
    """Name of the phase `step` is in: `initial` before the first `phase_steps` boundary; for
    `piecewise`, `initial` during warm-up and then the name of the segment `step` is in."""
    if schedule.schedule_type == ScheduleType.PIECEWISE:
        if step < schedule.warmup_iters or not schedule.segments:
            return INITIAL_PHASE
        index = _segment_index(step, schedule.segments)
        return segment_name(index, schedule.segments[index])
    passed = bisect.bisect_right(list(schedule.phase_steps), step)
    if passed == 0:
        return INITIAL_PHASE
    names = list(schedule.phase_names)
    return names[passed - 1] if passed - 1 < len(names) else f"phase{passed}"


def _progress(step: int, start: float, end: float) -> float:
    """Fraction in [0, 1] of the way from `start` to `end` (1 when the span is empty)."""
    if end <= start:
        return 1.0
    return min(1.0, max(0.0, (step - start) / (end - start)))


@SCHEDULES.register(ScheduleType.COSINE)
def _cosine(step: int, schedule: LRScheduleConfig, peak_lr: float) -> float:
    if step >= decay_end(schedule):
        return schedule.min_lr
    ratio = _progress(step, schedule.warmup_iters, decay_end(schedule))
    return schedule.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak_lr - schedule.min_lr)


@SCHEDULES.register(ScheduleType.LINEAR)
def _linear(step: int, schedule: LRScheduleConfig, peak_lr: float) -> float:
    if step >= decay_end(schedule):
        return schedule.min_lr
    ratio = _progress(step, schedule.warmup_iters, decay_end(schedule))
    return peak_lr - ratio * (peak_lr - schedule.min_lr)


@SCHEDULES.register(ScheduleType.CONSTANT)
def _constant(step: int, schedule: LRScheduleConfig, peak_lr: float) -> float:
    return peak_lr


@SCHEDULES.register(ScheduleType.WSD)
def _wsd(step: int, schedule: LRScheduleConfig, peak_lr: float) -> float:
    """Warmup-stable-decay: hold, then linear decay over the last `decay_fraction` of the steps
    up to `lr_decay_iters` (never starting before the end of warm-up)."""
    end = decay_end(schedule)
    if step >= end:
        return schedule.min_lr
    decay_start = max(float(schedule.warmup_iters), end * (1.0 - schedule.decay_fraction))
    if step < decay_start:
        return peak_lr
    ratio = _progress(step, decay_start, end)
    return peak_lr - ratio * (peak_lr - schedule.min_lr)


@SCHEDULES.register(ScheduleType.COSINE_RESTARTS)
def _cosine_restarts(step: int, schedule: LRScheduleConfig, peak_lr: float) -> float:
    """`num_cycles` equal cosine cycles from peak_lr to min_lr between warm-up and lr_decay_iters;
    each cycle restarts at peak_lr."""
    end = decay_end(schedule)
    if step >= end:
        return schedule.min_lr
    start = schedule.warmup_iters
    cycle = (end - start) / schedule.num_cycles
    position = ((step - start) % cycle) / cycle
    return schedule.min_lr + 0.5 * (1.0 + math.cos(math.pi * position)) * (
        peak_lr - schedule.min_lr
    )


@SCHEDULES.register(ScheduleType.MULTI_PHASE)
def _multi_phase(step: int, schedule: LRScheduleConfig, peak_lr: float) -> float:
    """peak_lr times `phase_decay` per `phase_steps` boundary reached, floored at min_lr."""
    if step >= decay_end(schedule):
        return schedule.min_lr
    passed = bisect.bisect_right(list(schedule.phase_steps), step)
    return max(schedule.min_lr, peak_lr * schedule.phase_decay**passed)


def segment_name(index: int, segment: LRSegment) -> str:
    """The phase name of segments[index]: its `name`, or `segment<index + 1>`."""
    return segment.name if segment.name is not None else f"segment{index + 1}"


def _segment_index(step: int, segments: list[LRSegment]) -> int:
    """Index of the segment `step` (past warm-up) is in; the last one once all have ended."""
    for index, segment in enumerate(segments):
        if step < segment.until:
            return index
    return len(segments) - 1


@SCHEDULES.register(ScheduleType.PIECEWISE)
def _piecewise(step: int, schedule: LRScheduleConfig, peak_lr: float) -> float:
    """`segments` in order: each goes from the previous one's final lr (peak_lr for the first)
    to its own by its shape; steps [start, until) are the segment's, so a linear or cosine one
    reaches its lr exactly at `until`, where the next segment takes over. A segment that ends
    before warm-up does is empty but still sets the lr the next one starts from."""
    start, before = float(schedule.warmup_iters), peak_lr
    for segment in schedule.segments:
        if step < segment.until:
            if segment.shape == Shape.CONSTANT:
                return segment.lr
            ratio = _progress(step, start, segment.until)
            if segment.shape == Shape.COSINE:
                return segment.lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (before - segment.lr)
            return before + ratio * (segment.lr - before)
        start, before = max(start, float(segment.until)), segment.lr
    return before  # after the last segment: its lr for ever (peak_lr if there are none)


SCHEDULES.complete()


class LRSchedule:
    """The run's position on its schedule (Stateful: state_dict / load_state_dict): `step` is the
    number of optimizer steps done, so lr() is the learning rate of the next one."""

    def __init__(self, schedule: LRScheduleConfig, peak_lr: float) -> None:
        self.schedule = schedule  # LRScheduleConfig, resolved
        self.peak_lr = peak_lr
        self.step = 0

    def lr(self, step: int | None = None) -> float:
        return lr_at(self.step if step is None else step, self.schedule, self.peak_lr)

    def phase(self, step: int | None = None) -> str:
        return phase_at(self.step if step is None else step, self.schedule)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
