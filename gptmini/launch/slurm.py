"""The Slurm launcher: one `sbatch --nodes N` job whose step runs one torchrun agent per node.

    sbatch job.sh  ->  srun --ntasks-per-node 1  ->  torchrun --nnodes $SLURM_NNODES --rdzv-backend c10d
                                                        --rdzv-endpoint <first node>:<port> -m gptmini.train ...

As torchtitan, torchtune and nanotron run on Slurm: Slurm places the nodes, torchrun's c10d rendezvous forms the
process group on them, nothing of ours in between. The run folder must be on storage every node sees at the same
path. The trainer always runs with `--resume auto`, so a requeued job (`requeue=True`, after a node failure or a
preemption) and a retried one both resume from the run's last checkpoint. Slurm signals SIGTERM before it kills
(scancel, preemption, the time limit), and the trainer checkpoints on it.

The job is followed through `scontrol show job` (slurmctld keeps a finished job for MinJobAge, 300 s by default),
then `sacct` where accounting is on; its output file is streamed line by line as it grows.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gptmini.errors import Failure, UserError
from gptmini.files import write_atomic

# A state none of these is still queued, running or being requeued.
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                      "BOOT_FAIL", "DEADLINE"})
# The rendezvous port is the job id's offset from this base, so jobs sharing a first node don't collide.
RDZV_PORT_BASE = 29500


class SlurmError(UserError):
    """sbatch refused the job (an unknown partition or account, a malformed #SBATCH line): a retry can't help."""


@dataclass
class SlurmOptions:
    """What a site's Slurm asks for; nodes and processes per node come from the run itself.

    partition, account: `--partition`, `--account` (None: the site's default).
    time_limit: `--time`, e.g. "04:00:00" (None: the partition's).
    gpus_per_node: `--gpus-per-node`; 0 asks for none (CPU training).
    sbatch_lines: more `#SBATCH` options, each one like "--qos=high" or "--signal=TERM@120".
    requeue: `--requeue`: Slurm may put the job back in the queue after a node failure or a preemption, and the
        requeued job resumes from the last checkpoint.
    """
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None
    gpus_per_node: int = 0
    sbatch_lines: list[str] = field(default_factory=list)
    requeue: bool = False

    def check(self) -> None:
        if self.gpus_per_node < 0:
            raise UserError(f"gpus_per_node ({self.gpus_per_node}) must be >= 0")
        for line in self.sbatch_lines:
            if not line.startswith("-") or "\n" in line:
                raise UserError(f"sbatch line {line!r} is not one sbatch option; write it like '--qos=high'")


def batch_script(trainer_args: list[str], *, nodes: int, nproc_per_node: int, options: SlurmOptions, output: Path,
                 job_name: str = "gptmini", python: str = sys.executable) -> str:
    """The sbatch script: one task per node, each a torchrun agent of a c10d rendezvous on the first node."""
    if nodes < 1 or nproc_per_node < 1:
        raise UserError(f"nodes ({nodes}) and nproc_per_node ({nproc_per_node}) must be >= 1")
    options.check()
    sbatch = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--output={output}",
              "--open-mode=append",  # a requeued job appends to what the follower is reading
              "--requeue" if options.requeue else "--no-requeue"]
    sbatch += [f"--partition={options.partition}"] if options.partition else []
    sbatch += [f"--account={options.account}"] if options.account else []
    sbatch += [f"--time={options.time_limit}"] if options.time_limit else []
    sbatch += [f"--gpus-per-node={options.gpus_per_node}"] if options.gpus_per_node else []
    sbatch += options.sbatch_lines
    torchrun = [shlex.quote(python), "-m", "torch.distributed.run", "--nnodes", "$SLURM_NNODES",
                f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d", '--rdzv-endpoint="$head:$port"',
                '--rdzv-id="$SLURM_JOB_ID"', "-m", "gptmini.train", *map(shlex.quote, trainer_args)]
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {line}" for line in sbatch),
        "set -euo pipefail",
        "# The rendezvous store lives on the first node, at the address slurmctld reaches it by.",
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'head=$(scontrol show node "$first" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")',
        f"port=$(( {RDZV_PORT_BASE} + SLURM_JOB_ID % 1000 ))",
        'echo "gptmini: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (restart ${SLURM_RESTART_COUNT:-0}), '
        'rendezvous at $head:$port"',
        "export PYTHONUNBUFFERED=1",
        "srun --label --kill-on-bad-exit=1 " + " ".join(torchrun),
        "",
    ])


def _run(cmd: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise Failure(f"{cmd[0]} is not on PATH: run on a Slurm login node, or use launcher 'local'") from None


def submit(script: Path, env: dict[str, str] | None = None) -> str:
    """sbatch the script; returns the job id. A job sbatch refuses is a SlurmError, with sbatch's reason."""
    proc = _run(["sbatch", "--parsable", str(script)], env)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch refused {script}: {proc.stderr.strip() or proc.stdout.strip()}; fix the Slurm "
                         "options (partition, account, time limit, sbatch lines)")
    return proc.stdout.strip().split(";")[0]


def job_state(job_id: str, env: dict[str, str] | None = None) -> str | None:
    """PENDING, RUNNING, COMPLETED, FAILED, ... as Slurm names it; None when Slurm no longer knows the job."""
    proc = _run(["scontrol", "show", "job", "-o", job_id], env)
    if proc.returncode == 0 and (found := re.search(r"\bJobState=(\S+)", proc.stdout)):
        return found.group(1)
    proc = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], env)  # gone from slurmctld's memory
    words = proc.stdout.split() if proc.returncode == 0 else []
    return words[0] if words else None  # "CANCELLED by 0" -> CANCELLED


def cancel(job_id: str, env: dict[str, str] | None = None) -> None:
    """scancel: Slurm sends SIGTERM (the trainer checkpoints), then SIGKILL after KillWait."""
    _run(["scancel", job_id], env)


def _drain(output: Path, pos: int, on_line: Callable[[str], None]) -> int:
    """Send each complete line added to `output` since byte `pos` to on_line; returns the new position."""
    try:
        with output.open("rb") as f:
            f.seek(pos)
            data = f.read()
    except FileNotFoundError:  # the job has not started
        return pos
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        on_line(line)
    return pos + end


def follow(job_id: str, output: Path, on_line: Callable[[str], None], env: dict[str, str] | None = None,
           poll: float = 2.0) -> str:
    """Stream the job's output into on_line until it ends; returns its end state. If this is interrupted (the
    flow run cancelled, Ctrl-C), the job is scancelled: nothing keeps running that nobody follows."""
    pos, state = 0, None
    try:
        while True:
            state = job_state(job_id, env)
            pos = _drain(output, pos, on_line)
            if state in TERMINAL:
                return state
            if state is None:
                return "UNKNOWN"  # purged before we saw its end: a retry resumes from the checkpoint anyway
            time.sleep(poll)
    finally:
        if state not in TERMINAL and state is not None:
            cancel(job_id, env)


def write_script(trainer_args: list[str], run_dir: Path, *, nodes: int, nproc_per_node: int, options: SlurmOptions,
                 job_name: str = "gptmini") -> Path:
    """`run_dir/slurm-job.sh`, whose output goes to `run_dir/slurm-<job id>.out`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / "slurm-job.sh"
    write_atomic(script, batch_script(trainer_args, nodes=nodes, nproc_per_node=nproc_per_node, options=options,
                                      output=run_dir / "slurm-%j.out", job_name=job_name))
    return script


def launch(trainer_args: list[str], run_dir: Path, *, nodes: int, nproc_per_node: int, options: SlurmOptions,
           on_line: Callable[[str], None], env: dict[str, str] | None = None, job_name: str = "gptmini",
           on_submit: Callable[[str], None] | None = None) -> str:
    """Write the job script, submit it, and follow the job to its end; returns the end state."""
    script = write_script(trainer_args, run_dir, nodes=nodes, nproc_per_node=nproc_per_node, options=options,
                          job_name=job_name)
    job_id = submit(script, env)
    if on_submit is not None:
        on_submit(job_id)
    return follow(job_id, run_dir / f"slurm-{job_id}.out", on_line, env)
