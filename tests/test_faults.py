"""Fault injection into the trainer: kill -9 at random steps and mid-checkpoint, SIGTERM as a
preemption, a full disk while a checkpoint is written, and one torchrun rank killed under --max-restarts.

After each fault: the latest complete checkpoint loads, nothing half-written is taken for complete, the
shards still verify, and the run resumes to the very losses of an uninterrupted run (bit for bit on CPU in
deterministic mode). Every trial is counted in BASETEMP/faults.json (trials run / survived), and the
summary is printed at the end of the module.
"""
from __future__ import annotations

import os
import random
import re
import resource
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from fault_helpers import STEPS, env, ledger_fixture, train_cmd, wait_for
from gptmini.checkpoint import MARKER, is_complete, latest_checkpoint, list_checkpoints, load_model, read_json
from gptmini.metrics import read_metrics, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.dist]

KILL = "kill -9 of the trainer at a random step"
KILL_MID_WRITE = "kill -9 of the trainer while a checkpoint is written"
SIGTERM = "SIGTERM to the trainer (preemption) at a random step"
FULL_DISK = "full disk (RLIMIT_FSIZE) while a checkpoint is written"
RANK_KILL = "kill -9 of one torchrun rank under --max-restarts 3"


@pytest.fixture(scope="module")
def ledger(request, tmp_path_factory):
    yield from ledger_fixture(request, tmp_path_factory)


def run_to_end(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def baseline(prepared_shards, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("baseline") / "run"
    run_to_end(train_cmd(prepared_shards, out))
    return train_losses(read_metrics(out / "metrics.jsonl"))


def losses(out: Path) -> dict[int, float]:
    return train_losses(read_metrics(out / "metrics.jsonl"))


def start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """In its own session, so a kill reaches the whole process tree."""
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def logged(log: Path, step: int) -> bool:
    """This process has finished `step` (metrics.jsonl may still hold a killed run's later steps)."""
    return log.exists() and re.search(rf"^step\s+{step}/", log.read_text(errors="replace"), re.M) is not None


def kill_tree(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def latest_step(out: Path) -> int:
    latest = latest_checkpoint(out)
    return int(latest.name.split("_")[1]) if latest else 0


def check_after_fault(out: Path, prepared_shards: Path) -> None:
    """The invariants every fault must leave: complete checkpoints load, half-written ones are not taken."""
    from gptmini.data.loader import TokenShards
    from gptmini.weights import load_pretrained

    root = out / "checkpoints"
    for folder in root.glob("step_*"):
        assert is_complete(folder), f"{folder} has a checkpoint's name but no {MARKER}"
    for half in root.glob(".tmp_*"):
        assert half not in list_checkpoints(out)
    latest = latest_checkpoint(out)
    if latest is not None:
        model, _ = load_model(latest)
        assert read_json(latest / "trainer_state.json")["step"] == int(latest.name.split("_")[1])
    if (root / "best" / "model.safetensors").exists():
        load_pretrained(root / "best")
    TokenShards.open(prepared_shards, "train", verify=True)
    TokenShards.open(prepared_shards, "val", verify=True)


def inject_kill(prepared_shards: Path, out: Path, rng: random.Random) -> None:
    first = latest_step(out) + 1
    step = rng.randint(first, min(first + 2, STEPS - 1))
    log = out.parent / f"segment-{rng.random():.6f}.log"
    proc = start(train_cmd(prepared_shards, out), log)
    wait_for(lambda: logged(log, step), f"step {step}", proc=proc)
    kill_tree(proc)


def inject_kill_mid_write(prepared_shards: Path, out: Path) -> None:
    """SIGKILL as soon as a new checkpoint's temporary folder appears (DCP writes ~100 MB into it)."""
    done = latest_step(out)
    root = out / "checkpoints"

    def writing() -> bool:
        return any(int(p.name.rsplit("_", 1)[1]) > done for p in root.glob(".tmp_step_*"))

    proc = start(train_cmd(prepared_shards, out), out.parent / "mid-write.log")
    wait_for(writing, "a checkpoint write", proc=proc)
    kill_tree(proc)


def inject_sigterm(prepared_shards: Path, out: Path, rng: random.Random) -> None:
    first = latest_step(out) + 1
    step = rng.randint(first, min(first + 2, STEPS - 1))
    log = out.parent / f"segment-{rng.random():.6f}.log"
    proc = start(train_cmd(prepared_shards, out), log)
    wait_for(lambda: logged(log, step), f"step {step}", proc=proc)
    proc.send_signal(signal.SIGTERM)  # the trainer itself, as a scheduler preempting it would
    assert proc.wait(timeout=300) == 0
    summary = read_json(out / "summary.json")
    assert summary["status"] == "preempted"
    assert latest_step(out) == summary["steps"] >= step, "the preempted run did not checkpoint where it stopped"


def inject_full_disk(prepared_shards: Path, out: Path) -> None:
    """A 1 MB file-size limit: metrics and config files fit, the ~100 MB checkpoint (or best/) does not."""
    before = [p.name for p in list_checkpoints(out)]
    limit = 1 << 20

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    log = out.parent / "full-disk.log"
    proc = start(train_cmd(prepared_shards, out), log, preexec_fn=cap)
    # The write fails (EFBIG, or torch's zip writer finding a short file) and the trainer exits non-zero.
    assert proc.wait(timeout=600) != 0, log.read_text()[-2000:]
    assert [p.name for p in list_checkpoints(out)] == before
    assert not [p for p in (out / "checkpoints").glob(".tmp_step_*") if (p / MARKER).exists()]


def test_trainer_faults_cost_only_the_steps_since_the_last_checkpoint(prepared_shards, baseline, ledger, tmp_path):
    out = tmp_path / "run"
    rng = random.Random()
    faults = [KILL, KILL_MID_WRITE, SIGTERM, KILL, FULL_DISK, KILL]
    survived = []
    for fault in faults:
        ledger.run(fault)
        if fault == KILL:
            inject_kill(prepared_shards, out, rng)
        elif fault == KILL_MID_WRITE:
            inject_kill_mid_write(prepared_shards, out)
        elif fault == SIGTERM:
            inject_sigterm(prepared_shards, out, rng)
        else:
            inject_full_disk(prepared_shards, out)
        check_after_fault(out, prepared_shards)
        survived.append(fault)
    run_to_end(train_cmd(prepared_shards, out))
    check_after_fault(out, prepared_shards)
    assert losses(out) == baseline, "a resumed run's losses differ from the uninterrupted run's"
    assert read_json(out / "summary.json")["status"] == "completed"
    for fault in survived:
        ledger.survived(fault)


def test_a_rank_killed_under_max_restarts_recovers_from_the_last_checkpoint(prepared_shards, ledger, tmp_path):
    steps = ("--steps", "8")
    ddp = ("--parallel", "ddp")
    run_to_end(train_cmd(prepared_shards, tmp_path / "base", *ddp, *steps, nproc=2))
    expected = losses(tmp_path / "base")

    out = tmp_path / "run"
    with ledger.trial(RANK_KILL):
        proc = start(train_cmd(prepared_shards, out, *ddp, *steps, nproc=2, torchrun_args=("--max-restarts", "3")),
                     tmp_path / "torchrun.log")
        step = random.Random().randint(3, 6)
        wait_for(lambda: step in losses(out), f"step {step}", proc=proc)

        def rank_1() -> list[psutil.Process]:
            found = []
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "1" and "gptmini.train" in " ".join(child.cmdline()):
                        found.append(child)
                except psutil.NoSuchProcess:
                    pass
            return found

        victims = rank_1()
        assert victims, "no rank-1 worker found under torchrun"
        for victim in victims:
            victim.kill()
        # Restarted rounds once read the previous round's gloo addresses (fixed in parallel.init_distributed).
        assert proc.wait(timeout=600) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
        log = (tmp_path / "torchrun.log").read_text()
        assert "resumed from" in log, "the restarted workers did not resume from a checkpoint"
        check_after_fault(out, prepared_shards)
        assert losses(out) == expected
        assert read_json(out / "summary.json")["status"] == "completed"
