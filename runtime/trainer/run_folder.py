"""Run folders: which run an `out_dir` belongs to, and refusing to mix two runs in one.

A run gets a random id when it starts fresh, written to `<out_dir>/run.json` and into every
metrics row and checkpoint. A fresh start into a folder holding another run's results
(metrics.jsonl, or step / best checkpoints in the save folder) is a config error unless `overwrite`
is set, which deletes them and the rest of that run's files (log, run.json, plot, sample,
tokenizer) first. `resume_from latest` takes only checkpoints of
the folder's own run (see runtime/checkpoint/manager.py: find_resume).
"""

import datetime
import json
import os
import re
import uuid

from generated import PATH
from generated.names import ResumeFrom
from generated.parser import ConfigError, Problem, Source
from runtime.checkpoint.format import BEST_NAME, step_checkpoints
from runtime.components.logs import LOG_NAME
from runtime.components.metrics import METRICS_NAME, PLOT_NAME
from runtime.components.tokenizer import HF_CONFIG_FILE, TOKENIZER_FILE
from runtime.utils.files import atomic_write_bytes

RUN_FILE = "run.json"
SAMPLE_NAME = "sample.txt"
RUN_FILES = (
    RUN_FILE,
    METRICS_NAME,
    LOG_NAME,
    PLOT_NAME,
    SAMPLE_NAME,
    TOKENIZER_FILE,
    HF_CONFIG_FILE,
)


def rank_log_name(rank: int) -> str:
    """The warnings and errors of process `rank` > 0 (the main process's go to train.log)."""
    return f"train.rank{rank}.log"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_run_id(out_dir: str) -> str | None:
    """The run id recorded in `<out_dir>/run.json`, or None."""
    path = os.path.join(out_dir, RUN_FILE)
    try:
        with open(path) as f:
            return str(json.load(f)["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_file(out_dir: str, run_id: str) -> None:
    record = {
        "run_id": run_id,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    atomic_write_bytes(os.path.join(out_dir, RUN_FILE), (json.dumps(record) + "\n").encode())


def run_results(out_dir: str, ckpt_dir: str) -> list[str]:
    """The files that show a run trained in this folder: metrics.jsonl and checkpoints. (run.json
    and train.log alone are left by a launch that failed before its first step: nothing to lose.)"""
    found = (
        [os.path.join(out_dir, METRICS_NAME)]
        if os.path.isfile(os.path.join(out_dir, METRICS_NAME))
        else []
    )
    found += [path for _, path in step_checkpoints(ckpt_dir)]
    best = os.path.join(ckpt_dir, BEST_NAME)
    if os.path.isfile(best):
        found.append(best)
    return found


def run_files(out_dir: str, ckpt_dir: str) -> list[str]:
    """Every file a run leaves in `out_dir` and its checkpoint folder."""
    found = [
        os.path.join(out_dir, n) for n in RUN_FILES if os.path.isfile(os.path.join(out_dir, n))
    ]
    if os.path.isdir(out_dir):
        ranks = [n for n in os.listdir(out_dir) if re.fullmatch(r"train\.rank\d+\.log", n)]
        found += [os.path.join(out_dir, n) for n in sorted(ranks)]
    return found + [p for p in run_results(out_dir, ckpt_dir) if p not in found]


def claim_for_fresh_start(
    out_dir: str, ckpt_dir: str, *, overwrite: bool, restart_same_run: bool
) -> list[str]:
    """Make `out_dir` ready for a run starting at step 0; returns the paths deleted.

    `restart_same_run`: resume_from is set but there was no checkpoint to resume from, and the
    folder's run.json says it is that run (killed before its first checkpoint): it starts over."""
    found = run_results(out_dir, ckpt_dir)
    if found and not (overwrite or restart_same_run):
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        owner = read_run_id(out_dir)
        owner = f"run {owner}" if owner else "another run"
        message = (
            f"{out_dir} holds the files of {owner} ({shown}); a new run would mix with them. "
            f"Pass --{PATH.checkpointer.resume_from} {ResumeFrom.LATEST} to continue it, "
            f"--{PATH.overwrite} true to delete them and start over, or choose another --{PATH.out_dir}"
        )
        raise ConfigError([Problem(PATH.out_dir, message, Source("file", out_dir, 0), "file")])
    removed = run_files(out_dir, ckpt_dir)
    for path in removed:
        os.unlink(path)
    return removed
