"""The two-node Slurm cluster of tests/slurm_cluster.py (jobs span both emulated nodes, scancel reaches them,
stopping a cluster leaves none of its daemons or job processes behind), and the Slurm launcher on it:
`gptmini launch slurm` queues a job and scancels it when killed, and the train-gpt flow with launcher='slurm'
trains the tiny preset across both nodes through a requeue and a scancel. How `gptmini launch` exits once its
job ended is tests/test_ending.py's; what the batch script holds is the last test here."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from slurm_cluster import NODES, SlurmCluster, slurm_cluster_fixture  # noqa: F401  (the fixture)
from test_flows import TINY, flow_run_logs, stack  # noqa: F401  (the session's Prefect and MLflow servers, for in-process flows)

from gptmini import registry
from gptmini.checkpoint import list_checkpoints, read_json
from gptmini.launch.slurm import SlurmOptions

pytestmark = [pytest.mark.slow]


def pid_alive(pid: int) -> bool:
    """Running, not a zombie: a job's processes are not our children, and a container's pid 1 may never reap
    them."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_srun_runs_one_task_on_each_node(slurm_cluster: SlurmCluster):
    done = slurm_cluster.run("srun", "-N2", "-n2", "bash", "-c", "echo $SLURMD_NODENAME")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == list(NODES)


def test_scancel_turns_a_running_two_node_job_cancelled(slurm_cluster: SlurmCluster):
    job_id = slurm_cluster.sbatch("--nodes", "2", "--wrap", "sleep 300")
    job = slurm_cluster.wait_job(job_id, {"RUNNING"}, timeout=30)
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2"
    slurm_cluster.run("scancel", job_id, check=True)
    assert slurm_cluster.wait_job(job_id, {"CANCELLED"}, timeout=30)["JobState"] == "CANCELLED"


def test_stop_leaves_no_daemon_or_job_process_and_spares_another_cluster(
        slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory):
    """A second cluster beside the module's one (what two xdist workers would start), stopped with a job
    still running on both nodes: its daemons and the job's processes are gone, and the first cluster still
    answers, since stop() ends processes by pid and never by name."""
    pids = tmp_path_factory.mktemp("pids") / "pids"
    second = SlurmCluster(tmp_path_factory.mktemp("slurm2")).start()
    try:
        second.sbatch("--nodes", "2", "--wrap", f"srun bash -c 'echo $$ >> {pids}; exec sleep 300'")
        second.wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, "both job steps to start", 30)
        daemons = second.alive()
        assert sorted(daemons) == ["munged", "slurmctld", "slurmd-n1", "slurmd-n2"]
    finally:
        second.stop()
    second.stop()  # idempotent
    job_pids = [int(pid) for pid in pids.read_text().split()]
    assert not [pid for pid in [*daemons.values(), *job_pids] if pid_alive(pid)]
    assert slurm_cluster.node_states() == {node: "idle" for node in NODES}


# The launcher: `gptmini launch slurm` and the flow's launcher='slurm', across both nodes


BIN = Path(sys.executable).parent
# The tiny preset as the reference runs train it (tests/train_helpers.py).
TRAIN = ["--preset", "tiny", "--parallel", "ddp", "--seq-len", "16", "--batch-size", "2", "--train.log_every", "1",
         "--train.ckpt_every", "2", "--train.eval_every", "4", "--train.eval_batches", "1"]


def launch(cluster: SlurmCluster, shards: Path, out: Path, steps: int, *options: str) -> subprocess.Popen:
    cmd = [str(BIN / "gptmini"), "launch", "slurm", "--nodes", "2", *options, "--", *TRAIN, "--steps", str(steps),
           "--data-dir", str(shards), "--out", str(out)]
    return subprocess.Popen(cmd, env=cluster.env, cwd=cluster.folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def running_job(cluster: SlurmCluster, timeout: float = 60) -> str:
    """The id of the one job running on the cluster."""
    found: list[str] = []

    def one() -> bool:
        found[:] = cluster.run("squeue", "-h", "-t", "RUNNING", "-o", "%i", timeout=20).stdout.split()
        return len(found) == 1

    cluster.wait_for(one, "one running job", timeout)
    return found[0]


def checkpointed(run_dir: Path, step: int) -> bool:
    return any(p.name == f"step_{step:08d}" for p in list_checkpoints(run_dir)) if run_dir.is_dir() else False


def test_killing_the_launcher_scancels_its_job(slurm_cluster: SlurmCluster, small_shards, tmp_path):
    """SIGTERM unwinds `gptmini launch slurm` through its follower, which scancels the job. The job it queued
    carries `--requeue` (the requeued job resuming is the flow test's)."""
    proc = launch(slurm_cluster, small_shards, tmp_path / "run", 10_000, "--requeue")
    try:
        job = running_job(slurm_cluster)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    ended = slurm_cluster.wait_job(job, {"CANCELLED"}, timeout=60)
    assert ended["JobState"] == "CANCELLED" and ended["Requeue"] == "1"


def test_a_job_sbatch_refuses_is_a_usage_error(slurm_cluster: SlurmCluster, small_shards, tmp_path, monkeypatch,
                                               capsys):
    """`gptmini launch slurm` run in this process (its exit code and stderr are the console script's)."""
    from gptmini.cli import main

    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    code = main(["launch", "slurm", "--nodes", "2", "--partition", "nope", "--", *TRAIN, "--steps", "2",
                 "--data-dir", str(small_shards), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "sbatch refused" in err and "nope" in err


def requeue(cluster: SlurmCluster, job: str) -> None:
    """`scontrol requeue`, as after a node failure; then an admin's release of the requeued job, since
    slurmctld holds it for 120 s (its begin time) before it may start again."""
    assert cluster.run("scontrol", "requeue", job).returncode == 0
    cluster.wait_job(job, {"PENDING"}, timeout=60)
    assert cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0


def requeue_then_scancel(cluster: SlurmCluster, runs: Path, flow_done: threading.Event) -> str | None:
    """Requeue the flow's job once it has checkpointed step 2, and scancel it once its second start has
    checkpointed a step of its own. Returns the job's id, or None if the flow ended first."""
    def soon(condition: Callable[[], bool], what: str) -> bool:
        cluster.wait_for(lambda: flow_done.is_set() or condition(), what, 300)
        return not flow_done.is_set()

    if not soon(lambda: any(checkpointed(run, 2) for run in runs.glob("*")), "the checkpoint at step 2"):
        return None
    job = running_job(cluster)
    requeue(cluster, job)
    before = checkpoints(runs)  # the requeued job's last one is written: its processes have exited
    if not soon(lambda: checkpoints(runs) - before, "a checkpoint of the requeued job"):
        return None
    cluster.run("scancel", job)
    return job


def checkpoints(runs: Path) -> set[Path]:
    return {p for run in runs.glob("*") for p in list_checkpoints(run)}


def resumed_at(text: str) -> int:
    """The step the first resumption in `text` started from."""
    found = re.search(r"resumed from \S+ at step (\d+)", text)
    assert found, f"no resumption in:\n{text[-3000:]}"
    return int(found.group(1))


# Over 60 s: the one two-node flow run of the suite (4 ranks on a 2-D mesh); one training is both requeued and
# scancelled, so it starts three jobs' worth of torchrun agents and ranks.
@pytest.mark.dist
def test_flow_on_slurm_spans_both_nodes_a_requeued_job_resumes_and_a_scancelled_one_is_retried_and_resumes(
        slurm_cluster, stack, monkeypatch):
    """train-gpt with launcher='slurm' over 2 nodes of 2 ranks on a 2-D mesh (FSDP across the nodes, the
    experts split over each node's pair by EP), with slurm.requeue: the job is requeued once it has
    checkpointed step 2 (as after a node failure) and starts again from its checkpoint; it is scancelled once
    that second start has checkpointed, the train task fails as retryable, its retry submits a new job that
    resumes there, and the flow registers a version."""
    from flows import tasks
    from flows.train_gpt import train_gpt

    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])  # the flow's sbatch reaches our cluster
    monkeypatch.setattr(tasks, "train", tasks.train.with_options(retry_delay_seconds=0))  # no 10 s pause to wait out
    runs = Path(os.environ["GPTMINI_STATE"]) / "runs"
    flow_done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        interrupted = pool.submit(requeue_then_scancel, slurm_cluster, runs, flow_done)
        try:
            state = train_gpt(**{**TINY, "steps": 12}, launcher="slurm", nnodes=2, nproc=2, parallel="fsdp+ep:2",
                              slurm=SlurmOptions(requeue=True), train_retries=1, model_name="slurm",
                              extra_args=["--train.ckpt_every", "2", "--train.log_every", "1"], return_state=True)
        finally:
            flow_done.set()
        job = interrupted.result()
    assert job, "the job finished before it could be requeued and scancelled"
    assert state.is_completed(), state.message
    result = state.result()
    text = "\n".join(flow_run_logs(state.state_details.flow_run_id))
    jobs = re.findall(r"submitted Slurm job (\d+)", text)
    assert len(jobs) == 2 and jobs[0] == job, text[-3000:]
    first, retried = text.split(f"submitted Slurm job {jobs[1]}")
    # The requeued job ran the same script again (Slurm's restart count), resuming from its checkpoint.
    assert "(restart 0)" in first and "(restart 1)" in first and slurm_cluster.job(job)["Restarts"] == "1"
    requeued_at = resumed_at(first.split("(restart 1)")[1])
    assert requeued_at >= 2 and "Slurm job ended CANCELLED" in first
    # The retry's job resumed from a checkpoint the requeued job wrote after its own resumption.
    assert resumed_at(retried) > requeued_at
    assert re.search(r"^0: ", text, re.M) and re.search(r"^1: ", text, re.M)  # srun --label: a task per node
    assert all(slurm_cluster.job(job)["NodeList"] == "n[1-2]" for job in jobs)
    summary = read_json(Path(result["run_dir"]) / "summary.json")
    assert summary["status"] == "completed" and summary["steps"] == 12 and summary["world_size"] == 4
    assert summary["mesh"] == "fsdp 2 x ep 2"
    assert registry.client(stack).get_model_version("slurm", result["version"]).run_id == result["mlflow_run_id"]


def test_cancelling_the_flow_run_scancels_its_job(slurm_cluster: SlurmCluster, stack):  # noqa: F811
    """`prefect flow-run cancel` has the runner or worker SIGTERM the flow run's process, which Prefect's engine
    raises as a TerminationSignal: on its way out, the train task's follower scancels the job."""
    from prefect.settings import PREFECT_API_URL

    flow = ("from flows.train_gpt import train_gpt; train_gpt(preset='tiny', steps=100000, launcher='slurm', "
            "nnodes=2, extra_args=['--train.eval_every', '100000'], train_retries=0)")
    proc = subprocess.Popen([sys.executable, "-c", flow], env={**os.environ, **slurm_cluster.env,
                                                                "PREFECT_API_URL": PREFECT_API_URL.value()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        job = running_job(slurm_cluster, timeout=240)
        os.killpg(proc.pid, signal.SIGTERM)  # what the runner sends
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert slurm_cluster.wait_job(job, {"CANCELLED"}, timeout=60)["JobState"] == "CANCELLED"


def test_the_batch_script_carries_every_slurm_option(tmp_path):
    from gptmini.launch.slurm import batch_script

    options = SlurmOptions(partition="gpu", account="ml", time_limit="04:00:00", gpus_per_node=8,
                           sbatch_lines=["--qos=high", "--signal=TERM@120"], requeue=True)
    script = batch_script(["--preset", "seed", "--out", "/shared/run 1"], nodes=4, nproc_per_node=8, options=options,
                          output=tmp_path / "slurm-%j.out")
    sbatch = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert sbatch == ["--job-name=gptmini", "--nodes=4", "--ntasks-per-node=1", f"--output={tmp_path}/slurm-%j.out",
                      "--open-mode=append", "--requeue", "--partition=gpu", "--account=ml", "--time=04:00:00",
                      "--gpus-per-node=8", "--qos=high", "--signal=TERM@120"]
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--nnodes $SLURM_NNODES --nproc-per-node=8 --rdzv-backend=c10d" in srun
    assert srun.endswith("-m gptmini.train --preset seed --out '/shared/run 1'")  # quoted for the shell
