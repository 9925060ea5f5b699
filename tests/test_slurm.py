"""The two-node Slurm cluster of tests/slurm_cluster.py (jobs span both emulated nodes, scancel reaches them,
stopping a cluster leaves none of its daemons or job processes behind), and the Slurm launcher on it:
`gptmini launch slurm` and the train-gpt flow with launcher='slurm' train the tiny preset across both nodes."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from slurm_cluster import NODES, SlurmCluster, slurm_cluster_fixture  # noqa: F401  (the fixture)
from test_flows import TINY, stack  # noqa: F401  (the session's Prefect and MLflow servers, for in-process flows)

from gptmini import registry
from gptmini.checkpoint import list_checkpoints, read_json

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
# The tiny preset as the reference runs train it (tests/train_helpers.py): a checkpoint every 2 steps to resume from.
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


# Over 60 s: slurmctld holds a requeued job before it starts again, and the job runs twice across two nodes.
def test_launch_requeued_job_resumes_from_its_checkpoint(slurm_cluster: SlurmCluster, small_shards, tmp_path):
    """`--requeue`: Slurm requeues the job mid-training (as after a node failure); the same script runs again,
    resumes from the last checkpoint, and the command exits 0 once the job completes."""
    out = tmp_path / "run"
    proc = launch(slurm_cluster, small_shards, out, 8, "--requeue")
    try:
        job = running_job(slurm_cluster)
        slurm_cluster.wait_for(lambda: checkpointed(out, 2) or proc.poll() is not None, "the checkpoint at step 2",
                               240)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert slurm_cluster.run("scontrol", "requeue", job).returncode == 0
        # slurmctld holds a requeued job for 120 s (its begin time); an admin's release, so the test doesn't wait.
        slurm_cluster.wait_job(job, {"PENDING"}, timeout=60)
        assert slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0
        text, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, text[-3000:]
    assert "restart 1" in text and "resumed from" in text, text[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["status"] == "completed" and summary["steps"] == 8 and summary["world_size"] == 2
    assert slurm_cluster.job(job)["NodeList"] == "n[1-2]"


def test_killing_the_launcher_scancels_its_job(slurm_cluster: SlurmCluster, small_shards, tmp_path):
    proc = launch(slurm_cluster, small_shards, tmp_path / "run", 10_000)
    try:
        job = running_job(slurm_cluster)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert slurm_cluster.wait_job(job, {"CANCELLED"}, timeout=60)["JobState"] == "CANCELLED"


def test_a_job_sbatch_refuses_is_a_usage_error(slurm_cluster: SlurmCluster, small_shards, tmp_path):
    proc = launch(slurm_cluster, small_shards, tmp_path / "run", 2, "--partition", "nope")
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, text
    assert "sbatch refused" in text and "nope" in text and "Traceback" not in text


# Over 60 s: the one two-node flow run of the suite (4 ranks on a 2-D mesh), scancelled, retried and resumed.
@pytest.mark.dist
def test_flow_on_slurm_spans_both_nodes_and_a_scancelled_job_is_retried_and_resumes(slurm_cluster, stack,
                                                                                    monkeypatch):
    """train-gpt with launcher='slurm' over 2 nodes of 2 ranks on a 2-D mesh (FSDP across the nodes, the
    experts split over each node's pair by EP): the job is scancelled once it has checkpointed step 2;
    the train task fails as retryable, its retry submits a new job that resumes there, and the flow
    registers a version."""
    from flows.train_gpt import train_gpt

    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])  # the flow's sbatch reaches our cluster
    runs = Path(os.environ["GPTMINI_STATE"]) / "runs"
    cancelled: list[str] = []
    stop = threading.Event()

    def scancel_once() -> None:
        while not stop.is_set() and not cancelled:
            jobs = slurm_cluster.run("squeue", "-h", "-t", "RUNNING", "-o", "%i", timeout=20).stdout.split()
            if jobs and any(checkpointed(run, 2) for run in runs.glob("*")):
                slurm_cluster.run("scancel", jobs[0])
                cancelled.append(jobs[0])
            time.sleep(0.3)

    watcher = threading.Thread(target=scancel_once, daemon=True)
    watcher.start()
    try:
        state = train_gpt(**{**TINY, "steps": 8}, launcher="slurm", nnodes=2, nproc=2, parallel="fsdp+ep:2",
                          train_retries=1, model_name="slurm",
                          extra_args=["--train.ckpt_every", "2", "--train.log_every", "1"], return_state=True)
    finally:
        stop.set()
        watcher.join()
    assert cancelled, "the job finished before it could be cancelled"
    assert state.is_completed(), state.message
    result = state.result()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    text = "\n".join(log.message for log in logs)
    jobs = re.findall(r"submitted Slurm job (\d+)", text)
    assert len(jobs) == 2 and jobs[0] == cancelled[0], text[-3000:]
    assert "Slurm job ended CANCELLED" in text and "resumed from" in text
    assert re.search(r"^0: ", text, re.M) and re.search(r"^1: ", text, re.M)  # srun --label: a task per node
    assert all(slurm_cluster.job(job)["NodeList"] == "n[1-2]" for job in jobs)
    summary = read_json(Path(result["run_dir"]) / "summary.json")
    assert summary["status"] == "completed" and summary["steps"] == 8 and summary["world_size"] == 4
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
    from gptmini.launch.slurm import SlurmOptions, batch_script

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
