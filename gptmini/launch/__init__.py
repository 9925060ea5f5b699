"""Launchers: where `torchrun -m gptmini.train ...` runs, and how its end reads.

- `local`: torchrun on this machine (`--standalone`), or one agent of an `--nnodes N` c10d rendezvous.
- `slurm` (`gptmini.launch.slurm`): one `sbatch --nodes N` job whose step `srun`s one torchrun agent per node.
- `k8s` (`gptmini.launch.k8s`): one Kubeflow Trainer TrainJob.

Every launcher takes the trainer's own arguments (what follows `-m gptmini.train`) and ends in a job state
named as Slurm names them. Anything but COMPLETED (FAILED, NODE_FAIL, PREEMPTED, TIMEOUT, CANCELLED, ...) is
worth a retry, which resumes from the run's last checkpoint (`--resume auto`), unless the trainer refused its
configuration or its data: that is read from its summary.json, not from the job state.
"""
from __future__ import annotations

import shlex

COMPLETED = "COMPLETED"
LAUNCHERS = ("local", "slurm", "k8s")


def torchrun_args(nproc: int, nnodes: int, rdzv_endpoint: str, rdzv_id: str) -> list[str]:
    """One node: --standalone (a free local port). Several: torchrun's c10d rendezvous, nothing of ours."""
    if nnodes == 1:
        return ["--standalone", f"--nproc-per-node={nproc}"]
    return [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]


def node_command(launch: list[str], trainer: list[str]) -> str:
    """The command a user pastes on each further node of a `--nnodes N` run: the same on every node."""
    return f"torchrun {shlex.join(launch)} -m gptmini.train {shlex.join(trainer)}"
