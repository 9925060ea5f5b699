"""Shared by the fault-injection tests (test_faults*.py): the ledger of trials run and survived. The training
every fault interrupts is train_helpers' recipe."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


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
