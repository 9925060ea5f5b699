"""Shared by the fault-injection tests (test_faults*.py): the ledger of trials run and survived, and the
tiny training command every fault interrupts."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
STEPS = 12
# The tiny preset, 16-token windows, a checkpoint every 2 steps, deterministic: resumes must reproduce
# every loss bit for bit.
COMMON = [
    "--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--steps", str(STEPS), "--deterministic",
    "--train.log_every", "1", "--train.ckpt_every", "2", "--train.eval_every", "6", "--train.eval_batches", "1",
    "--train.keep_last", "2", "--model.dropout", "0", "--model.aux_loss_coef", "0", "--resume", "auto",
]


def train_cmd(data_dir: Path, out: Path, *extra: str, nproc: int | None = None,
              torchrun_args: tuple[str, ...] = ()) -> list[str]:
    args = [*COMMON, "--data-dir", str(data_dir), "--out", str(out), *extra]
    if nproc is None:
        return [sys.executable, "-m", "gptmini.train", *args]
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), *torchrun_args,
            "-m", "gptmini.train", *args]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return {**base, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 240, proc=None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Ledger:
    """Trials run and survived per fault, in BASETEMP/faults.json (shared by the test modules, so a lock)."""

    def __init__(self, path: Path):
        self.path = path

    def _update(self, fault: str, key: str) -> None:
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            entry = data.setdefault(fault, {"trials": 0, "survived": 0})
            entry[key] += 1
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    def run(self, fault: str) -> None:
        self._update(fault, "trials")

    def survived(self, fault: str) -> None:
        self._update(fault, "survived")

    @contextlib.contextmanager
    def trial(self, fault: str) -> Iterator[None]:
        """Counted as run on entry, as survived only if the block (with its checks) completes."""
        self.run(fault)
        yield
        self.survived(fault)

    def summary(self) -> str:
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        rows = [f"  {fault:<58} {v['survived']}/{v['trials']} survived" for fault, v in sorted(data.items())]
        return "fault injection (trials survived / run), " + str(self.path) + "\n" + "\n".join(rows)


def ledger_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """Body of each fault module's `ledger` fixture: prints the summary when the module is done."""
    ledger = Ledger(tmp_path_factory.getbasetemp() / "faults.json")
    yield ledger
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + ledger.summary(), flush=True)
