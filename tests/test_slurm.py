"""The two-node Slurm cluster of tests/slurm_cluster.py: jobs span both emulated nodes, scancel reaches them,
and stopping a cluster leaves none of its daemons or job processes behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from slurm_cluster import NODES, SlurmCluster, slurm_cluster_fixture  # noqa: F401  (the fixture)

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
