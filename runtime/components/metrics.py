"""metrics.jsonl (one JSON object per logged step and per evaluation), the loss plot, and the
processor that sends each step's numbers to the jsonl, wandb, the log and the progress bar."""

import datetime
import json
import math
import os
import time
from typing import Any

from runtime.components import logs
from runtime.components.wandb_logger import WandbLogger

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
# keys that differ between two runs of the same config (compare rows without them)
VOLATILE_KEYS = frozenset({"tokens_per_s", "time", "elapsed_s", "run_id"})


def _plain(value: Any) -> Any:
    """JSON-safe value: tensors to numbers or lists, non-finite floats to strings."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class MetricsWriter:
    """Appends records to `<out_dir>/metrics.jsonl` (main process only).

    With a `run_id`, every row also carries `run_id`, `time` (wall clock, ISO 8601 with the UTC
    offset) and `elapsed_s` (seconds of training so far: `elapsed_offset`, the time of the runs
    before a resume, plus the time since this writer was made)."""

    def __init__(
        self,
        out_dir: str,
        enabled: bool = True,
        run_id: str | None = None,
        elapsed_offset: float = 0.0,
    ) -> None:
        self.path = os.path.join(out_dir, METRICS_NAME)
        self.enabled = enabled
        self.run_id = run_id
        self.elapsed_offset = float(elapsed_offset)
        self._start = time.monotonic()
        self.best_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_val_improved = False
        if enabled:
            os.makedirs(out_dir, exist_ok=True)

    def elapsed(self) -> float:
        return self.elapsed_offset + time.monotonic() - self._start

    def note_val_loss(self, val_loss: float) -> bool:
        """Track an evaluation's loss; returns whether it improved on the best so far (a NaN/inf
        loss never counts as the best: it would stay "best" for ever)."""
        improved = math.isfinite(val_loss) and (
            self.best_val_loss is None or val_loss < self.best_val_loss
        )
        self.last_val_loss = val_loss
        self.last_val_improved = improved
        if improved:
            self.best_val_loss = val_loss
        return improved

    # Stateful: the validation record and the training time so far
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_val_loss": self.best_val_loss,
            "val_loss": self.last_val_loss,
            "last_val_improved": self.last_val_improved,
            "elapsed_s": self.elapsed(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_val_loss = state.get("best_val_loss")
        self.last_val_loss = state.get("val_loss")
        self.last_val_improved = bool(state.get("last_val_improved", False))
        self.elapsed_offset = float(state.get("elapsed_s") or 0.0)
        self._start = time.monotonic()

    def truncate_after(self, step: int) -> None:
        """Drop records with iter > step (left by a run that went on past the checkpoint it is
        now resumed from), so that a resumed run's file reads like the uninterrupted one."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path, torn_tail=True) if r.get("iter", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.run_id is not None:
            now = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
            record = {
                **record,
                "run_id": self.run_id,
                "time": now,
                "elapsed_s": round(self.elapsed(), 3),
            }
        with open(self.path, "a") as f:
            f.write(json.dumps(_plain(record)) + "\n")


def read_metrics(path: str, torn_tail: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; `torn_tail` drops a last line cut short by a killed writer."""
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not (torn_tail and index == len(lines) - 1):
                raise
    return records


def plot_losses(out_dir: str) -> str | None:
    """Write `<out_dir>/loss.png`: train loss (total and main next-token) and val loss per step."""
    path = os.path.join(out_dir, METRICS_NAME)
    if not os.path.exists(path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    train = [r for r in records if "loss" in r and isinstance(r["loss"], (int, float))]
    val = [r for r in records if "val_loss" in r and isinstance(r["val_loss"], (int, float))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(
            [r["iter"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.6
        )
        if any("main_loss" in r for r in train):
            ax.plot(
                [r["iter"] for r in train],
                [r.get("main_loss", math.nan) for r in train],
                label="train main loss",
            )
    if val:
        ax.plot([r["iter"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = os.path.join(out_dir, PLOT_NAME)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class MetricsProcessor:
    """Where a step's and an evaluation's numbers go, all from here: metrics.jsonl (every
    `log_interval` steps and every evaluation), wandb, the log line (console and train.log) and, on
    a terminal, the progress bar (every step). Only the main process writes; the others pass
    through."""

    def __init__(
        self,
        writer: MetricsWriter,
        wandb: WandbLogger,
        *,
        max_iters: int,
        bytes_per_token: float | None,
        show_bar: bool,
    ) -> None:
        self.writer, self.wandb = writer, wandb
        self.max_iters = max_iters
        self.bytes_per_token = bytes_per_token  # None: unknown (a pre-tokenized corpus)
        self.show_bar = show_bar
        self.bar: Any = None
        self._epochs: dict[str, float] = {}  # each mixture source's epochs at the last log

    # ---- the progress bar (a bar in a file is one long line of \r updates: terminals only)

    def open_bar(self, step: int) -> None:
        if not self.show_bar:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=self.max_iters, initial=step, dynamic_ncols=True, desc="train")
        console = logs.console_handler()
        if console is not None:
            console.bar = self.bar

    def close_bar(self) -> None:
        """Ends the bar's line, so that what is printed next starts a line of its own."""
        console = logs.console_handler()
        if console is not None:
            console.bar = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # ---- steps and evaluations

    def step(self, metrics: dict[str, Any], tokens_per_s: float) -> None:
        """Every step: the bar."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                lr=f"{metrics['lr']:.2e}",
                tok_s=f"{tokens_per_s:,.0f}",
            )

    def log_step(self, record: dict[str, Any], eta_s: float) -> None:
        """A logged step (`record` has iter, the step's metrics, tokens (trained so far),
        batch_size (the step's global batch), skipped_batches (when data.skip_steps skipped any),
        tokens_per_s and the routing statistics): jsonl, wandb and the log line."""
        step = record["iter"]
        self.writer.write(record)
        self.wandb.log(record, step=step)
        skipped = " (skipped)" if record.get("skipped") else ""
        # the total carries the MTP, balance and z terms; the main loss is the next-token one
        logs.log.info(
            f"step {step}/{self.max_iters} | loss {record['loss']:.4f}{skipped} "
            f"(main {record['main_loss']:.4f}) | lr {record['lr']:.2e} | "
            f"{record['tokens_per_s']:,.0f} tok/s | eta {logs.format_duration(eta_s)}"
        )
        for key, epochs in record.items():  # a mixture source read through: say so once
            if key.startswith("data/") and key.endswith("/epochs"):
                if int(epochs) > int(self._epochs.get(key, epochs)):
                    name = key[len("data/") : -len("/epochs")]
                    logs.log.info(f"data source {name}: epoch {int(epochs) + 1} begins")
                self._epochs[key] = epochs

    def log_eval(self, step: int, val_loss: float) -> bool:
        """An evaluation's loss (and bits per byte where the bytes are known); returns whether it
        improved on the best so far."""
        improved = self.writer.note_val_loss(val_loss)
        best_val_loss = self.writer.best_val_loss
        record: dict[str, Any] = {
            "iter": step,
            "val_loss": val_loss,
            "best_val_loss": best_val_loss,
        }
        bpb = ""
        if self.bytes_per_token is not None:
            # nats per token -> bits per byte of text: comparable across tokenizers
            record["val_bpb"] = val_loss / math.log(2) / self.bytes_per_token
            bpb = f", {record['val_bpb']:.4f} bits/byte"
        self.writer.write(record)
        self.wandb.log({k: v for k, v in record.items() if k != "iter"}, step=step)
        best = "none" if best_val_loss is None else f"{best_val_loss:.4f}"
        logs.log.info(f"step {step}: val loss {val_loss:.4f}{bpb} (best {best})")
        return improved
