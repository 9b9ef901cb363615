"""lr_at / phase_at: boundary steps of every schedule type."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from generated.config import LRScheduleConfig
from runtime.components.lr_schedule import lr_at, phase_at, schedule_warnings

PEAK = 1e-3
MIN = 1e-4


def sched(**kw):
    base = dict(warmup_iters=10, lr_decay_iters=110, min_lr=MIN)
    base.update(kw)
    return LRScheduleConfig(**base)


def lr(step, **kw):
    return lr_at(step, sched(**kw), PEAK)


@pytest.mark.parametrize(
    "kind", ["cosine", "linear", "constant", "wsd", "cosine_restarts", "multi_phase"]
)
def test_warmup_is_linear_from_zero_to_peak(kind):
    extra = {"phase_steps": [50], "phase_names": ["b"]} if kind == "multi_phase" else {}
    assert lr(0, schedule_type=kind, **extra) == 0.0
    assert lr(1, schedule_type=kind, **extra) == pytest.approx(PEAK / 10)
    assert lr(5, schedule_type=kind, **extra) == pytest.approx(PEAK / 2)
    assert lr(9, schedule_type=kind, **extra) == pytest.approx(PEAK * 0.9)
    assert lr(10, schedule_type=kind, **extra) == pytest.approx(PEAK)  # end of warm-up: the peak


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "cosine_restarts", "multi_phase"])
def test_decaying_types_end_at_min_lr(kind):
    extra = {"phase_steps": [50], "phase_names": ["b"]} if kind == "multi_phase" else {}
    assert lr(110, schedule_type=kind, **extra) == pytest.approx(MIN)
    assert lr(111, schedule_type=kind, **extra) == pytest.approx(MIN)
    assert lr(10_000, schedule_type=kind, **extra) == pytest.approx(MIN)


def test_cosine():
    assert lr(60, schedule_type="cosine") == pytest.approx(MIN + 0.5 * (PEAK - MIN))
    assert lr(35, schedule_type="cosine") == pytest.approx(
        MIN + 0.5 * (1 + math.cos(math.pi / 4)) * (PEAK - MIN)
    )
    assert lr(109, schedule_type="cosine") > MIN


def test_linear():
    assert lr(60, schedule_type="linear") == pytest.approx((PEAK + MIN) / 2)
    assert lr(35, schedule_type="linear") == pytest.approx(PEAK - 0.25 * (PEAK - MIN))


def test_constant_stays_at_peak_forever():
    assert lr(10, schedule_type="constant") == PEAK
    assert lr(110, schedule_type="constant") == PEAK
    assert lr(10_000, schedule_type="constant") == PEAK


def test_wsd():
    # decay over the last 20% of the 110 steps up to lr_decay_iters: from step 88 to 110
    kw = dict(schedule_type="wsd", decay_fraction=0.2)
    assert lr(10, **kw) == pytest.approx(PEAK)
    assert lr(87, **kw) == pytest.approx(PEAK)
    assert lr(88, **kw) == pytest.approx(PEAK)
    assert lr(99, **kw) == pytest.approx((PEAK + MIN) / 2)
    assert lr(110, **kw) == pytest.approx(MIN)
    # a decay longer than the stable part starts at the end of warm-up
    kw = dict(schedule_type="wsd", decay_fraction=1.0)
    assert lr(10, **kw) == pytest.approx(PEAK)
    assert lr(60, **kw) == pytest.approx((PEAK + MIN) / 2)


def test_cosine_restarts():
    kw = dict(schedule_type="cosine_restarts", num_cycles=2)  # cycles of 50 steps: 10..60, 60..110
    assert lr(10, **kw) == pytest.approx(PEAK)
    assert lr(35, **kw) == pytest.approx((PEAK + MIN) / 2)
    assert lr(59, **kw) == pytest.approx(MIN, abs=2e-6)
    assert lr(60, **kw) == pytest.approx(PEAK)  # restart
    assert lr(85, **kw) == pytest.approx((PEAK + MIN) / 2)
    assert lr(110, **kw) == pytest.approx(MIN)
    # one cycle is plain cosine
    for step in (10, 33, 60, 100):
        assert lr(step, schedule_type="cosine_restarts", num_cycles=1) == pytest.approx(
            lr(step, schedule_type="cosine")
        )


def test_multi_phase():
    kw = dict(
        schedule_type="multi_phase",
        phase_steps=[40, 70, 100],
        phase_names=["a", "b", "c"],
        phase_decay=0.1,
    )
    assert lr(39, **kw) == pytest.approx(PEAK)
    assert lr(40, **kw) == pytest.approx(PEAK * 0.1)
    assert lr(69, **kw) == pytest.approx(PEAK * 0.1)
    assert lr(70, **kw) == pytest.approx(MIN)  # 1e-5 floored at min_lr
    assert lr(100, **kw) == pytest.approx(MIN)
    assert lr(110, **kw) == pytest.approx(MIN)


@pytest.mark.parametrize(
    "kind", ["cosine", "linear", "constant", "wsd", "cosine_restarts", "multi_phase"]
)
def test_decay_lr_false_is_constant_after_warmup(kind):
    extra = {"phase_steps": [50], "phase_names": ["b"]} if kind == "multi_phase" else {}
    assert lr(5, schedule_type=kind, decay_lr=False, **extra) == pytest.approx(PEAK / 2)
    for step in (10, 50, 60, 110, 5000):
        assert lr(step, schedule_type=kind, decay_lr=False, **extra) == PEAK


def test_no_warmup_starts_at_peak():
    assert lr(0, schedule_type="cosine", warmup_iters=0) == PEAK
    assert lr(0, schedule_type="wsd", warmup_iters=0) == PEAK


def test_phase_names():
    s = sched(schedule_type="multi_phase", phase_steps=[40, 70], phase_names=["mid", "late"])
    assert [phase_at(t, s) for t in (0, 39, 40, 69, 70, 500)] == [
        "initial",
        "initial",
        "mid",
        "mid",
        "late",
        "late",
    ]
    assert phase_at(5, sched()) == "initial"
    # reported for any schedule type
    s = sched(schedule_type="cosine", phase_steps=[3], phase_names=["x"])
    assert phase_at(3, s) == "x"


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["cosine", "linear", "constant", "wsd", "cosine_restarts", "multi_phase"]),
    warmup=st.integers(0, 50),
    extra=st.integers(1, 200),
    step=st.integers(0, 400),
    cycles=st.integers(1, 5),
)
def test_lr_is_bounded(kind, warmup, extra, step, cycles):
    s = sched(
        schedule_type=kind,
        warmup_iters=warmup,
        lr_decay_iters=warmup + extra,
        num_cycles=cycles,
        phase_steps=[warmup + 1],
        phase_names=["p"],
    )
    value = lr_at(step, s, PEAK)
    assert 0.0 <= value <= PEAK * (1 + 1e-12)
    if step >= warmup:
        assert value >= MIN * (1 - 1e-12)


# --- piecewise ---------------------------------------------------------------------------------


def piecewise(*segments, **kw):
    """A piecewise schedule: warm-up 10 steps to PEAK, then `segments` (until, lr, shape, name)."""
    from generated.config import LRSegment

    items = [LRSegment(until=u, lr=v, shape=shape, name=name) for u, v, shape, name in segments]
    return sched(schedule_type="piecewise", segments=items, **kw)


def test_piecewise_constant_segments_jump_at_their_start_and_hold_after_the_last():
    s = piecewise((40, PEAK, "constant", "stable"), (60, MIN, "constant", None))
    assert lr_at(5, s, PEAK) == pytest.approx(PEAK / 2)  # warm-up as every type
    assert [lr_at(t, s, PEAK) for t in (10, 39)] == [PEAK, PEAK]
    assert [lr_at(t, s, PEAK) for t in (40, 59, 60, 10_000)] == [MIN, MIN, MIN, MIN]
    # past lr_decay_iters (110) nothing changes: piecewise ignores it, and min_lr
    assert lr_at(500, piecewise((40, 3e-4, "constant", None)), PEAK) == 3e-4


def test_piecewise_linear_and_cosine_go_from_the_previous_lr_to_their_own():
    s = piecewise((30, PEAK, "constant", None), (70, MIN, "linear", None))
    assert lr_at(30, s, PEAK) == pytest.approx(PEAK)  # starts at the previous segment's lr
    assert lr_at(50, s, PEAK) == pytest.approx((PEAK + MIN) / 2)
    assert lr_at(69, s, PEAK) == pytest.approx(MIN + (PEAK - MIN) / 40)
    assert lr_at(70, s, PEAK) == pytest.approx(MIN)
    s = piecewise(
        (30, PEAK, "constant", None), (70, MIN, "cosine", None), (90, 0.0, "linear", None)
    )
    assert lr_at(30, s, PEAK) == pytest.approx(PEAK)
    assert lr_at(40, s, PEAK) == pytest.approx(
        MIN + 0.5 * (1 + math.cos(math.pi / 4)) * (PEAK - MIN)
    )
    assert lr_at(50, s, PEAK) == pytest.approx((PEAK + MIN) / 2)  # the cosine's midpoint
    assert lr_at(80, s, PEAK) == pytest.approx(MIN / 2)  # the next one starts from MIN
    # a first segment that decays starts from the peak at the end of warm-up
    s = piecewise((110, 0.0, "linear", None))
    assert lr_at(10, s, PEAK) == pytest.approx(PEAK) and lr_at(60, s, PEAK) == pytest.approx(
        PEAK / 2
    )


def test_piecewise_phase_names():
    s = piecewise(
        (40, PEAK, "constant", "stable"), (60, MIN, "cosine", None), (80, MIN, "constant", "tail")
    )
    names = [phase_at(t, s) for t in (0, 9, 10, 39, 40, 59, 60, 79, 80, 5000)]
    assert names == ["initial", "initial", "stable", "stable"] + ["segment2"] * 2 + ["tail"] * 4
    # phase_steps belong to the other types: piecewise names its segments
    s = piecewise((40, PEAK, "constant", "a"), phase_steps=[20], phase_names=["x"])
    assert phase_at(25, s) == "a"


def test_piecewise_warns_when_the_run_ends_before_its_last_segment():
    s = piecewise((40, PEAK, "constant", None), (200, MIN, "cosine", None))
    [warning] = schedule_warnings(s, max_iters=150)
    assert "schedule.segments[1].until (200) > training.max_iters (150)" in warning
    assert "ends before the schedule does" in warning
    # lr_decay_iters (110 here) means nothing to piecewise: no warning about it either way
    assert schedule_warnings(s, max_iters=200) == []
    assert schedule_warnings(s, max_iters=500) == []
    assert schedule_warnings(sched(schedule_type="cosine"), max_iters=500) != []  # as before
