"""Fault injection into the trainer: kill -9 at random steps and mid-checkpoint, SIGTERM as a preemption and
SIGINT as Ctrl-C, a full disk while a checkpoint is written, one torchrun rank killed under --max-restarts,
SIGTERM to torchrun itself with two ranks, and kill -9 of a tensor-parallel run.

After each fault: the latest complete checkpoint loads, nothing half-written is taken for complete, the
shards still verify, and the run resumes to the very losses of the uninterrupted reference run (bit for bit
on CPU in deterministic mode). Every trial is counted in BASETEMP/faults.json (trials run / survived), and the
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

from fault_helpers import ledger_fixture
from train_helpers import STEPS, env, run_to_end, train_cmd, wait_for
from gptmini.checkpoint import MARKER, is_complete, latest_checkpoint, list_checkpoints, read_json
from gptmini.weights import load_model
from gptmini.metrics import read_metrics, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.dist]

KILL = "kill -9 of the trainer at a random step"
KILL_MID_WRITE = "kill -9 of the trainer while a checkpoint is written"
SIGTERM = "SIGTERM to the trainer (preemption) at a random step"
SIGINT = "SIGINT to the trainer (Ctrl-C) at a random step"
FULL_DISK = "full disk (RLIMIT_FSIZE) while a checkpoint is written"
RANK_KILL = "kill -9 of one torchrun rank under --max-restarts 3"
TORCHRUN_SIGTERM = "SIGTERM to torchrun with 2 FSDP ranks (preemption)"
TP_KILL = "kill -9 of a 2-rank tensor-parallel MoE run mid-interval"


@pytest.fixture(scope="module")
def ledger(request, tmp_path_factory):
    yield from ledger_fixture(request, tmp_path_factory)


@pytest.fixture(scope="module")
def baseline(reference_runs) -> dict[int, float]:
    return losses(reference_runs["1p"])


def resumed(data_dir: Path, out: Path, *extra: str, **kw) -> list[str]:
    return train_cmd(data_dir, out, "--resume", "auto", *extra, **kw)


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


def check_after_fault(out: Path, small_shards: Path) -> None:
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
    TokenShards.open(small_shards, "train", verify=True)
    TokenShards.open(small_shards, "val", verify=True)


def inject_kill(small_shards: Path, out: Path, rng: random.Random) -> None:
    # A step right after the last checkpoint, or the one after: the trainer runs on while the kill is sent (more
    # so on a busy machine), and the later faults in the chain need steps of their own.
    first = latest_step(out) + 1
    step = rng.randint(first, min(first + 1, STEPS - 1))
    log = out.parent / f"segment-{rng.random():.6f}.log"
    proc = start(resumed(small_shards, out), log)
    wait_for(lambda: logged(log, step), f"step {step}", proc=proc)
    kill_tree(proc)


def inject_kill_mid_write(small_shards: Path, out: Path) -> None:
    """SIGKILL as soon as a new checkpoint's temporary folder appears (DCP writes 3 MB into it and fsyncs:
    tens of milliseconds, so the folder is looked for every millisecond)."""
    done = latest_step(out)
    root = out / "checkpoints"

    def writing() -> bool:
        return any(int(p.name.rsplit("_", 1)[1]) > done for p in root.glob(".tmp_step_*"))

    proc = start(resumed(small_shards, out), out.parent / "mid-write.log")
    wait_for(writing, "a checkpoint write", proc=proc, poll=0.001)
    kill_tree(proc)


def inject_signal(small_shards: Path, out: Path, rng: random.Random, sig: signal.Signals) -> None:
    """SIGTERM (a scheduler preempting the trainer) or SIGINT (Ctrl-C): the step finishes, a checkpoint is
    written where it stopped, exit 0."""
    first = latest_step(out) + 1
    step = min(rng.randint(first, first + 1), STEPS - 2)  # it stops after this step or the next: before the end
    assert step >= first, f"no step left to interrupt after the checkpoint of step {first - 1}"
    log = out.parent / f"segment-{rng.random():.6f}.log"
    proc = start(resumed(small_shards, out), log)
    wait_for(lambda: logged(log, step), f"step {step}", proc=proc)
    proc.send_signal(sig)  # the trainer itself
    assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    summary = read_json(out / "summary.json")
    assert summary["status"] == "preempted" and sig.name in log.read_text()
    assert latest_step(out) == summary["steps"] >= step, "the preempted run did not checkpoint where it stopped"


def inject_full_disk(small_shards: Path, out: Path) -> None:
    """A 256 KB file-size limit: metrics and config files fit, the 3 MB checkpoint (or best/'s 1 MB) does not."""
    before = [p.name for p in list_checkpoints(out)]
    limit = 1 << 18

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    log = out.parent / "full-disk.log"
    proc = start(resumed(small_shards, out), log, preexec_fn=cap)
    # The write fails (EFBIG, or torch's zip writer finding a short file) and the trainer exits non-zero.
    assert proc.wait(timeout=600) != 0, log.read_text()[-2000:]
    assert [p.name for p in list_checkpoints(out)] == before
    assert not [p for p in (out / "checkpoints").glob(".tmp_step_*") if (p / MARKER).exists()]


# About 60 s: five faults, each a trainer process started and resumed (the start, torch's import, is most of
# it); one chain in one run folder, so every fault also resumes from what the previous one left.
def test_trainer_faults_cost_only_the_steps_since_the_last_checkpoint(small_shards, baseline, ledger, tmp_path):
    out = tmp_path / "run"
    rng = random.Random()
    faults = [KILL, KILL_MID_WRITE, SIGTERM, FULL_DISK, SIGINT]  # each leaves the next a step to interrupt
    survived = []
    for fault in faults:
        ledger.run(fault)
        if fault == KILL:
            inject_kill(small_shards, out, rng)
        elif fault == KILL_MID_WRITE:
            inject_kill_mid_write(small_shards, out)
        elif fault in (SIGTERM, SIGINT):
            inject_signal(small_shards, out, rng, signal.SIGTERM if fault == SIGTERM else signal.SIGINT)
        else:
            inject_full_disk(small_shards, out)
        check_after_fault(out, small_shards)
        survived.append(fault)
    run_to_end(resumed(small_shards, out))
    check_after_fault(out, small_shards)
    assert losses(out) == baseline, "a resumed run's losses differ from the uninterrupted run's"
    assert read_json(out / "summary.json")["status"] == "completed"
    for fault in survived:
        ledger.survived(fault)


def rank_workers(torchrun: subprocess.Popen, rank: str | None = None) -> list[psutil.Process]:
    """The `gptmini.train` workers under a torchrun process (those of one rank, if given)."""
    found = []
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            if "gptmini.train" in " ".join(child.cmdline()) and rank in (None, child.environ().get("RANK")):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_rank_killed_under_max_restarts_recovers_from_the_last_checkpoint(small_shards, reference_runs, ledger,
                                                                           tmp_path):
    out = tmp_path / "run"
    with ledger.trial(RANK_KILL):
        proc = start(resumed(small_shards, out, "--parallel", "ddp", nproc=2, torchrun_args=("--max-restarts", "3")),
                     tmp_path / "torchrun.log")
        step = random.Random().randint(3, 6)
        wait_for(lambda: step in losses(out), f"step {step}", proc=proc)
        victims = rank_workers(proc, rank="1")
        assert victims, "no rank-1 worker found under torchrun"
        for victim in victims:
            victim.kill()
        # Restarted rounds once read the previous round's gloo addresses (fixed in parallel.init_distributed).
        assert proc.wait(timeout=600) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
        log = (tmp_path / "torchrun.log").read_text()
        assert "resumed from" in log, "the restarted workers did not resume from a checkpoint"
        check_after_fault(out, small_shards)
        assert losses(out) == losses(reference_runs["ddp"])
        assert read_json(out / "summary.json")["status"] == "completed"


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_the_sharded_checkpoint_resumes(small_shards, reference_runs, ledger,
                                                                           tmp_path):
    """What a scheduler's preemption does under torchrun: torchrun forwards SIGTERM to its ranks, they agree on a
    step, save one checkpoint there and exit 0; torchrun itself exits 1 (its SignalException). Under FSDP, so
    the checkpoint is sharded: the next `--resume auto` at the same world size (every rank's RNG carried over)
    repeats the uninterrupted FSDP run's losses bit for bit."""
    out = tmp_path / "run"
    cmd = resumed(small_shards, out, "--parallel", "fsdp", nproc=2)
    with ledger.trial(TORCHRUN_SIGTERM):
        log = tmp_path / "torchrun.log"
        proc = start(cmd, log)
        wait_for(lambda: 3 in losses(out), "step 3", proc=proc)
        workers = rank_workers(proc)
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)  # torchrun alone, not its process group
        assert proc.wait(timeout=300) == 1, log.read_text()[-3000:]
        assert all(not w.is_running() or w.status() == psutil.STATUS_ZOMBIE for w in workers)
        summary = read_json(out / "summary.json")
        assert summary["status"] == "preempted" and 3 <= summary["steps"] < STEPS
        assert [p.name for p in list_checkpoints(out)][-1] == f"step_{summary['steps']:08d}"
        assert read_json(latest_checkpoint(out) / "trainer_state.json")["world_size"] == 2
        check_after_fault(out, small_shards)
        assert "RNG streams start anew" not in run_to_end(cmd).stdout
        assert losses(out) == losses(reference_runs["fsdp"])


def test_a_killed_tensor_parallel_run_resumes_on_its_mesh_to_the_same_losses(small_shards, baseline, ledger,
                                                                            tmp_path):
    """kill -9 of both ranks of a TP 2 run of the tiny MoE (attention, the norms' sequence shards, the experts'
    hidden units and the vocabulary split over the pair; 2 micro-batches a step, so it sees one process's
    batches) after step 5, between its checkpoints at 4 and 8: `--resume auto` on the same mesh repeats the
    steps the killed run had logged bit for bit, and every step's loss is one process's within float32
    reduction order."""
    out = tmp_path / "run"
    cmd = resumed(small_shards, out, "--tp", "2", "--grad-accum", "2", "--train.ckpt_every", "4", nproc=2)
    with ledger.trial(TP_KILL):
        proc = start(cmd, tmp_path / "killed.log")
        wait_for(lambda: 5 in losses(out), "step 5", proc=proc)
        kill_tree(proc)
        killed = losses(out)
        assert latest_step(out) == 4, "the kill came after the step-8 checkpoint: nothing left to repeat"
        check_after_fault(out, small_shards)
        assert "resumed from" in run_to_end(cmd).stdout
        again = losses(out)
        assert {step: again[step] for step in killed} == killed
        assert again == pytest.approx(baseline, rel=1e-5)
        assert read_json(out / "summary.json")["mesh"] == "tp 2"
