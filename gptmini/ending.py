"""How a training run ended: `RUN/summary.json`, its `status`, and what a caller does about it.

The trainer writes it when the recipe finishes (`write`), and `gptmini train` when a run ends in an error
(`write_error`); `gptmini train` exits with `EXIT_CODES[status]`. Whoever launched the run (the flow's train
task, `gptmini launch slurm`) reads it with the launcher's own end (`outcome`): the summary of a completed run,
or a `TrainingFailed` that says whether a retry, which resumes from the last checkpoint, can help.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gptmini.data.sources import DataError
from gptmini.errors import UserError
from gptmini.files import read_json, write_json

SUMMARY = "summary.json"
COMPLETED, PREEMPTED = "completed", "preempted"
BAD_CONFIG, BAD_DATA, OOM, FAILED = "bad_config", "bad_data", "oom", "failed"
# 0 completed or preempted, 2 what the user must fix (errors.UserError's code), 1 anything else.
EXIT_CODES = {COMPLETED: 0, PREEMPTED: 0, BAD_CONFIG: 2, BAD_DATA: 2, OOM: 1, FAILED: 1}


class TrainingFailed(RuntimeError):
    """A run that did not complete. `retryable`: a retry (which resumes from the last checkpoint) can help;
    not for a bad configuration or bad data."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def status_of(exc: BaseException) -> str:
    """The status of a run that raised `exc`."""
    if isinstance(exc, DataError):
        return BAD_DATA
    if isinstance(exc, UserError):
        return BAD_CONFIG
    if isinstance(exc, torch.OutOfMemoryError):
        return OOM
    return FAILED


def path(run_dir: str | Path) -> Path:
    return Path(run_dir) / SUMMARY


def write(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    return write_json(path(run_dir), summary)


def write_error(run_dir: str | Path, status: str, error: str) -> None:
    """The summary of a run that ended in an error, so a caller reads how it ended instead of parsing output."""
    write(run_dir, {"status": status, "error": error, "exit_code": EXIT_CODES[status]})


def read(run_dir: str | Path) -> dict[str, Any] | None:
    """The trainer's account of how it ended; None when it wrote none (killed, or never started)."""
    return read_json(path(run_dir)) if path(run_dir).is_file() else None


def clear(run_dir: str | Path) -> None:
    """Before an attempt: a previous attempt's ending is not this one's."""
    path(run_dir).unlink(missing_ok=True)


def outcome(summary: dict[str, Any] | None, ok: bool, ended: str, tail: Sequence[str] = ()) -> dict[str, Any]:
    """The summary of a completed run, else a TrainingFailed that says how it ended and whether a retry can
    help. `ok`: the launcher ended well (exit code 0, a job COMPLETED); `ended` says how, in words. `tail` (the
    last output lines) is quoted only when the trainer wrote no summary."""
    status = summary["status"] if summary else None
    if status == COMPLETED and ok:
        return summary
    error = (summary or {}).get("error", "")
    if status == BAD_CONFIG:
        raise TrainingFailed(f"the trainer rejected its configuration: {error}. Fix the configuration (preset, "
                             "steps, parallel layout, extra train flags)", retryable=False)
    if status == BAD_DATA:
        raise TrainingFailed(f"the training data is unusable: {error}", retryable=False)
    if status == PREEMPTED:
        raise TrainingFailed(f"training stopped early (preempted at step {summary['steps']}); a retry resumes "
                             "from the checkpoint it saved", retryable=True)
    if status == OOM:
        raise TrainingFailed(f"training ran out of memory ({error}); a retry resumes from the last checkpoint, "
                             "but runs out again unless you lower the batch size (--batch-size 4 --grad-accum 2) "
                             "or use --parallel fsdp", retryable=True)
    if summary is None:
        last = "\n".join(list(tail)[-15:]) or "no output"
        raise TrainingFailed(f"training ended ({ended}) without a {SUMMARY}: a process was killed (SIGKILL: out "
                             "of host memory, or by hand) or the launcher could not start it; a retry resumes from "
                             f"the last checkpoint. Last output:\n{last}", retryable=True)
    why = error or f"it reported {status!r} but {ended}"
    raise TrainingFailed(f"training failed ({ended}): {why}; a retry resumes from the last checkpoint",
                         retryable=True)
