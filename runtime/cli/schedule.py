"""`deepseek-moe schedule CONFIG [--section.field VALUE ...] [--at POINTS] [--json] [--plot FILE]`:
what a config schedules over its run, before anything is launched: per point, the step, the tokens
trained before it, the learning rate, the global batch (sequences), the router bias update speed,
the MTP loss weight and the phase name.

By default one row per change: step 0, the end of warm-up, each batch-ramp stage, each segment end
or phase step, lr_decay_iters (decaying types), bias_update_speed_until, mtp_loss_weight_until, the
end of the MTP warm-up and max_iters. `--at 0,469B,10T,2000steps` picks the points instead: a token
count (K/M/B/T, `tokens` optional) is the first step by which that many tokens were trained (as a
config's `N tokens` resolves), `N steps` a step. `--plot` draws the four curves against tokens.

Every value comes from the functions the trainer calls (LRSchedule, mtp_weight_at,
bias_update_speed_at) and the config's BatchRamp; nothing is recomputed here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from generated import SPEC, Config, batch_ramp, resolve
from runtime.cli import console
from runtime.components.balancer import bias_update_speed_at
from runtime.components.loss import mtp_weight_at
from runtime.components.lr_schedule import NO_DECAY, LRSchedule, schedule_warnings
from runtime.configlib.quantities import (
    STEPS_TYPE,
    SUFFIXES,
    TOKENS_TYPE,
    BatchRamp,
    Quantity,
    format_count,
    parse_quantity,
)

PROG = "schedule"
USAGE = (
    "usage: deepseek-moe schedule CONFIG [--section.field VALUE ...] [--at POINTS] [--json] "
    "[--plot FILE.png]\n"
    "  --at POINTS   comma-separated token counts (469B, 10T tokens) or `N steps`; default: every\n"
    "                change of lr, batch, bias update speed, MTP weight or phase\n"
    "  --json        print a JSON list of {step, tokens, lr, batch_size, bias_update_speed,\n"
    "                mtp_weight, phase}\n"
    "  --plot FILE   draw lr, batch size, bias update speed and MTP weight against tokens\n"
)
OPTIONS_WITH_VALUE = ("--at", "--plot")
PLOT_SAMPLES = 400  # evenly spaced steps, on top of every boundary (enough to show a cosine)


class UsageError(Exception):
    """Wrong arguments: exit 2 with the message."""


@dataclass(frozen=True)
class Row:
    step: int
    tokens: int  # trained before `step`
    lr: float
    batch_size: int  # sequences of step `step`
    bias_update_speed: float
    mtp_weight: float
    phase: str


def main(argv: list[str]) -> int:
    def body() -> int:
        try:
            return _schedule(list(argv))
        except UsageError as error:
            console.error(PROG, error)
            return console.EXIT_USAGE

    return console.run_command(PROG, body)


def _take_options(argv: list[str]) -> tuple[dict[str, str], bool, list[str]]:
    """(--at / --plot values, --json, the rest) of a command line, options anywhere in it."""
    values: dict[str, str] = {}
    wants_json = False
    rest: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        name, has_value, value = token.partition("=")
        if token == "--json":
            wants_json = True
        elif name in OPTIONS_WITH_VALUE:
            if not has_value:
                if index == len(argv):
                    raise UsageError(f"{name} needs a value")
                value, index = argv[index], index + 1
            values[name] = value
        else:
            rest.append(token)
    return values, wants_json, rest


def _schedule(argv: list[str]) -> int:
    options, wants_json, rest = _take_options(argv)
    positionals, flags, wants_help = SPEC.split_command_line(rest)  # flags before or after CONFIG
    if wants_help:
        print(USAGE, end="")
        return console.EXIT_OK
    if len(positionals) != 1:
        got = " ".join(positionals) or "no file"
        raise UsageError(f"one config file expected, got {got} (schedule --help shows the usage)")
    plot = Path(options["--plot"]) if "--plot" in options else None
    if plot is not None and not plot.parent.is_dir():
        raise UsageError(f"--plot {plot}: no such folder {str(plot.parent)!r}")
    cfg = resolve(positionals[0], argv=flags).config
    ramp = _ramp(cfg)
    if "--at" in options:
        steps = parse_points(options["--at"], ramp)
    else:
        steps = change_points(cfg, ramp)
    rows = [row_at(step, cfg, ramp) for step in steps]
    for text in schedule_warnings(cfg.schedule, cfg.training.max_iters):
        console.warning(PROG, text)
    if wants_json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        print(format_table(rows, ramp))
    if plot is not None:
        draw(plot, cfg, ramp, change_points(cfg, ramp), title=Path(positionals[0]).name)
        print(f"{PROG}: wrote {plot}", file=sys.stderr)  # stdout stays the table (or JSON)
    return console.EXIT_OK


def _ramp(cfg: Config) -> BatchRamp:
    ramp = batch_ramp(cfg)
    if ramp is None:  # the spec names the batch schedule; a spec without one has no tokens
        raise UsageError("the config spec declares no batch schedule: tokens are unknown")
    return ramp


def parse_points(text: str, ramp: BatchRamp) -> list[int]:
    """The steps of `--at`: comma-separated token counts (`469B`, `10T tokens`) or `N steps`; a
    token count is the first step by which that many tokens were trained."""
    steps = []
    for item in text.split(","):
        quantity = parse_quantity(item, STEPS_TYPE)
        if not isinstance(quantity, Quantity):  # a bare count is tokens here
            quantity = parse_quantity(item, TOKENS_TYPE)
        if not isinstance(quantity, Quantity):
            raise UsageError(
                f"--at: bad point {item.strip()!r}: expected a token count (469B, 10T tokens) "
                "or `N steps`, comma-separated"
            )
        is_steps = quantity.unit == STEPS_TYPE
        steps.append(quantity.amount if is_steps else ramp.step_at_tokens(quantity.amount))
    return steps


def change_points(cfg: Config, ramp: BatchRamp) -> list[int]:
    """Every step where one of the printed values or the phase may change, sorted."""
    schedule, training = cfg.schedule, cfg.training
    points = {0, schedule.warmup_iters, training.max_iters, cfg.mtp.warmup_steps}
    points |= {stage.first_step for stage in ramp.stages}
    points |= {segment.until for segment in schedule.segments}
    points |= set(schedule.phase_steps)
    if schedule.decay_lr and schedule.schedule_type not in NO_DECAY:
        assert schedule.lr_decay_iters is not None  # a derived default: resolved
        points.add(schedule.lr_decay_iters)
    for until in (cfg.moe.bias_update_speed_until, cfg.mtp.mtp_loss_weight_until):
        if until is not None:
            points.add(until)
    return sorted(points)


def row_at(step: int, cfg: Config, ramp: BatchRamp) -> Row:
    schedule = LRSchedule(cfg.schedule, cfg.optimizer.lr)
    return Row(
        step=step,
        tokens=ramp.tokens_before(step),
        lr=schedule.lr(step),
        batch_size=ramp.batch(step),
        bias_update_speed=bias_update_speed_at(cfg.moe, step),
        mtp_weight=mtp_weight_at(cfg.mtp, step),
        phase=schedule.phase(step),
    )


def approx_count(n: int) -> str:
    """`n` in the paper's style, to 3 decimals of its largest unit (`~10.000T`); exact ones as
    format_count writes them (`469B`, `0`)."""
    for suffix in ("T", "B", "M", "K"):
        scale = SUFFIXES[suffix]
        if n >= scale:
            if n % (scale // 1000) == 0:
                return format_count(n)
            return f"~{n / scale:.3f}{suffix}"
    return format_count(n)


def format_table(rows: list[Row], ramp: BatchRamp) -> str:
    header = ("step", "tokens", "exact tokens", "lr", "batch", "bias speed", "mtp weight", "phase")
    cells = [
        (
            f"{row.step:,}",
            approx_count(row.tokens),
            f"{row.tokens:,}",
            f"{row.lr:.3e}",
            f"{row.batch_size:,}",
            f"{row.bias_update_speed:g}",
            f"{row.mtp_weight:g}",
            row.phase,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def line(values: tuple[str, ...]) -> str:  # numbers right-aligned, the phase left
        padded = [v.rjust(w) for v, w in zip(values[:-1], widths)] + [values[-1]]
        return "  ".join(padded).rstrip()

    return "\n".join([f"# {ramp.describe()}", line(header), *map(line, cells)])


def draw(path: Path, cfg: Config, ramp: BatchRamp, boundaries: list[int], title: str) -> None:
    """lr, batch size, bias update speed and MTP weight against tokens (in T), stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(boundaries)
    steps = set(range(0, end + 1, max(1, end // PLOT_SAMPLES)))
    steps |= set(boundaries) | {b - 1 for b in boundaries if b > 0}  # both sides of each jump
    rows = [row_at(step, cfg, ramp) for step in sorted(steps)]
    x = [row.tokens / 1e12 for row in rows]
    curves = (
        ("learning rate", [row.lr for row in rows]),
        ("batch (sequences)", [row.batch_size for row in rows]),
        ("bias update speed", [row.bias_update_speed for row in rows]),
        ("MTP loss weight", [row.mtp_weight for row in rows]),
    )
    figure, axes = plt.subplots(len(curves), 1, sharex=True, figsize=(8, 7), dpi=80)
    for axis, (label, values) in zip(axes, curves):
        axis.plot(x, values, linewidth=1.5)
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    axes[0].set_title(f"{title}: {ramp.describe()}", fontsize=10)
    axes[-1].set_xlabel("tokens trained (T)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
