"""The local launcher: torchrun on this machine (`--standalone`), or one agent of an `--nnodes N` c10d
rendezvous whose further agents a user starts with `node_command`, nothing of ours in between."""
from __future__ import annotations

import ctypes
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# Loaded here, not in the forked child, where only the prctl call itself runs.
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def torchrun_args(nproc: int, nnodes: int, rdzv_endpoint: str, rdzv_id: str) -> list[str]:
    """One node: --standalone (a free local port). Several: torchrun's c10d rendezvous, nothing of ours."""
    if nnodes == 1:
        return ["--standalone", f"--nproc-per-node={nproc}"]
    return [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]


def node_command(launch: list[str], trainer_args: list[str]) -> str:
    """The command a user pastes on each further node of a `--nnodes N` run: the same on every node."""
    return f"torchrun {shlex.join(launch)} -m gptmini.train {shlex.join(trainer_args)}"


def command(launch: list[str], trainer_args: list[str], python: str = sys.executable) -> list[str]:
    """`torchrun LAUNCH -m gptmini.train TRAINER_ARGS` with this interpreter's torch."""
    return [python, "-m", "torch.distributed.run", *launch, "-m", "gptmini.train", *trainer_args]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the caller dies (a cancelled flow run, a kill), so no torchrun is
    orphaned; torchrun forwards it to the ranks, which checkpoint and exit."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run(cmd: list[str], env: dict[str, str], on_line: Callable[[str], None], cwd: str | Path | None = None) -> int:
    """Run `cmd`, handing each non-blank output line to `on_line` as it comes; its exit code. Interrupted here
    (a cancellation), the child is stopped cleanly: SIGTERM, which the trainer answers with a checkpoint."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            text=True, errors="replace", bufsize=1, preexec_fn=_die_with_parent)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n").split("\r")[-1]  # a progress bar's last frame
            if line.strip():
                on_line(line)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
