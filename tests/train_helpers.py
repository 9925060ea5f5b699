"""The one training recipe of the end-to-end tests (conftest's reference runs, the fault, two-node and Slurm
tests), and how they start and watch a trainer.

The tiny preset on the 300-id BPE shards, 16-token windows, 8 steps, a checkpoint every 2 steps, deterministic:
a resumed run must reproduce every loss of an uninterrupted one bit for bit. One process runs 2 micro-batches
per step, so it sees the same 4 windows a step as 2 ranks do.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent
STEPS = 8
COMMON = [
    "--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--steps", str(STEPS), "--deterministic",
    "--train.log_every", "1", "--train.ckpt_every", "2", "--train.eval_every", "4", "--train.eval_batches", "1",
    "--train.keep_last", "2", "--model.dropout", "0",
    "--model.aux_loss_coef", "0",  # the MoE aux loss depends on how a batch is split over ranks and micro-batches
]


def train_cmd(data_dir: Path, out: Path, *extra: str, nproc: int | None = None,
              torchrun_args: tuple[str, ...] = ()) -> list[str]:
    args = [*COMMON, "--data-dir", str(data_dir), "--out", str(out), *extra]
    if nproc is None:
        return [sys.executable, "-m", "gptmini.train", "--grad-accum", "2", *args]
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), *torchrun_args,
            "-m", "gptmini.train", *args]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return {**base, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def run_to_end(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 240, proc=None, poll: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)
