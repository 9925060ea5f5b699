"""Launchers: where `torchrun -m gptmini.train ...` runs, and how its end reads.

- `local` (`gptmini.launch.local`): torchrun on this machine (`--standalone`), or one agent of an `--nnodes N`
  c10d rendezvous.
- `slurm` (`gptmini.launch.slurm`): one `sbatch --nodes N` job whose step `srun`s one torchrun agent per node.
- `k8s` (`gptmini.launch.k8s`): one Kubeflow Trainer TrainJob.

Every launcher takes the trainer's own arguments (what follows `-m gptmini.train`) and ends in torchrun's exit
code (local) or a job state named as Slurm names them. Anything but 0 or COMPLETED (FAILED, NODE_FAIL,
PREEMPTED, TIMEOUT, CANCELLED, ...) is worth a retry, which resumes from the run's last checkpoint
(`--resume auto`), unless the trainer refused its configuration or its data: that is read from its
summary.json (`gptmini.ending.outcome`), not from the job state.
"""
from __future__ import annotations

COMPLETED = "COMPLETED"
LAUNCHERS = ("local", "slurm", "k8s")
