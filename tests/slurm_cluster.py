"""A real two-node Slurm cluster on this one machine, for the launcher tests.

One munged, one slurmctld and two slurmd daemons (`slurmd -N n1`, `slurmd -N n2`), all started from a config
generated under a temporary folder, with free-picked ports and their own munge key and socket. Both emulated
nodes live on this host (NodeHostname = `hostname -s`, NodeAddr = 127.0.0.1) and share its cores, so
`srun -N2` runs one task on each. Nothing touches the system's Slurm or munge: every client command runs with
`SLURM_CONF` pointing at our config, whose AuthInfo names our munge socket.

A job's processes run as this user on this host, so they see the same venv (`sys.executable`) and files;
`sbatch` propagates the submitting environment (`--export=ALL` is its default).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import re
import secrets
import signal
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port

NODES = ("n1", "n2")
NODE_ADDR = "127.0.0.1"
PARTITION = "debug"
# apt's slurm-wlm puts the daemons in /usr/sbin, which is not on a non-login PATH.
SBIN = "/usr/sbin:/sbin"
NEEDED = ("slurmctld", "slurmd", "munged", "sbatch")
# A Unix socket path is at most 107 bytes, and slurmstepd puts one per step in the spool dir:
# `<folder>/spool/n1/n1_<job>.<step>`, where a batch step's id is 4294967291 (about 30 bytes past the folder).
MAX_SOCKET_DIR = 70
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def cannot_start(reason: str) -> None:
    """Under CI (`CI=true`) a cluster that cannot start fails the Slurm tests; elsewhere they skip, and
    conftest's skip check still fails the session (a Slurm skip is not on its allowlist)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"the test Slurm cluster cannot start under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def ensure_slurm() -> None:
    """Install slurm-wlm and munge with apt-get if a daemon or client is missing."""
    if os.geteuid() != 0:
        # slurmd must be root to run a job as its submitter, and SlurmUser=root is what our config says.
        cannot_start("the test Slurm cluster's daemons run as root; run these tests as root")
    missing = [name for name in NEEDED if which(name) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        cannot_start(f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get to install "
                     "it: install slurm-wlm (slurmctld, slurmd, clients) and munge")
    apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    done = subprocess.run(install, env=apt, capture_output=True, text=True)
    if done.returncode != 0:  # stale or empty package lists: refresh once and retry
        subprocess.run(["apt-get", "update"], env=apt, capture_output=True, text=True)
        done = subprocess.run(install, env=apt, capture_output=True, text=True)
    still = [name for name in NEEDED if which(name) is None]
    if done.returncode != 0 or still:
        pytest.fail(f"could not install Slurm (exit {done.returncode}, missing {still}):\n"
                    f"{(done.stdout + done.stderr)[-3000:]}", pytrace=False)


def tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no file)"


def die_with_parent() -> None:
    """SIGTERM this child when pytest dies without running its teardown or atexit (SIGKILL, os._exit from
    pytest-timeout's thread method), instead of leaving daemons behind."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM one daemon we started, by its pid; SIGKILL it if it has not exited within `timeout`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, all under `folder`. `start()` returns once every node is idle;
    `stop()` is idempotent and also runs at interpreter exit."""

    def __init__(self, folder: Path, nodes: tuple[str, ...] = NODES, cpus: int = 2):
        self.folder = folder.resolve()
        if len(str(self.folder)) > MAX_SOCKET_DIR:
            raise ValueError(f"{self.folder} is too long for Unix sockets under it; use a shorter temporary folder")
        self.nodes = nodes
        self.node_addr = NODE_ADDR
        self.hostname = socket.gethostname().split(".")[0]
        self.partition = PARTITION
        self.cpus = cpus
        self.conf = self.folder / "slurm.conf"
        self.munge_socket = self.folder / "munge" / "munge.socket"
        # A client inside a Slurm job would otherwise inherit that job's SLURM_* ids and talk about it.
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env = {**base, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.stopped = False

    def start(self, timeout: float = 60) -> SlurmCluster:
        atexit.register(self.stop)
        try:
            self._start_munged()
            self._write_conf()
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)], self.folder / "slurmctld.log")
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [which("slurmd"), "-D", "-N", node, "-f", str(self.conf)],
                            self.folder / f"slurmd-{node}.log")
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str], log: Path | None = None) -> None:
        out = self.folder / f"{name}.out"  # stdout/stderr, for what fails before the daemon opens its log
        # Own session: a Ctrl-C in the pytest terminal reaches pytest, whose teardown stops them in order.
        with out.open("w") as stdout:
            self.procs[name] = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True,
                                                preexec_fn=die_with_parent)
        if log is not None:
            self.logs[name] = log
        self.logs[f"{name} (stdout)"] = out

    def _start_munged(self) -> None:
        munge = self.folder / "munge"
        munge.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o755)
        key = munge / "munge.key"
        # munged refuses a key that is readable by group or others.
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(1024))
        # --force: munged wants every directory above its socket to be searchable by all (so any user can reach
        # it), and pytest's temporary folders are 0700; it then only warns.
        self._spawn("munged", [which("munged"), "-F", "--force", "--socket", str(self.munge_socket),
                               "--pid-file", str(munge / "munged.pid"), "--log-file", str(munge / "munged.log"),
                               "--seed-file", str(munge / "munged.seed"), "--key-file", str(key)])
        # (In the foreground munged logs to stderr, so munged.out, not its --log-file.)
        self.wait_for(lambda: self.munge_socket.exists(), "munged to open its socket", 20)

    def _write_conf(self) -> None:
        for sub in ("state", *(f"spool/{node}" for node in self.nodes)):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        node_lines = [f"NodeName={node} NodeHostname={self.hostname} NodeAddr={self.node_addr} "
                      f"Port={free_port()} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN" for node in self.nodes]
        f = self.folder
        lines = [
            f"ClusterName=c{secrets.token_hex(4)}",  # 22.05 requires one; unique so two clusters never mix
            f"SlurmctldHost={self.hostname}({self.node_addr})",
            f"SlurmctldPort={free_port()}",
            f"AuthInfo=socket={self.munge_socket}",  # our munged, not the system's /run/munge
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={f / 'state'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}",
            f"SlurmctldLogFile={f / 'slurmctld.log'}",
            f"SlurmdSpoolDir={f / 'spool'}/%n",
            f"SlurmdPidFile={f}/slurmd-%n.pid",
            f"SlurmdLogFile={f}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",  # no cgroups in a container
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",  # memory is not a consumable: jobs never wait on RealMemory
            "MpiDefault=none",
            "MailProg=/bin/true",
            "MinJobAge=600",  # `scontrol show job` keeps finished jobs and their end state
            "KillWait=30",  # between SIGTERM and SIGKILL: time for a trainer to write its checkpoint
            "JobRequeue=1",
            "ReturnToService=2",
            "SlurmdDebug=info",
            "SlurmctldDebug=info",
            *node_lines,
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def run(self, *cmd: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess:
        """A Slurm client command (sinfo, srun, sbatch, ...) against this cluster; text output captured.
        It runs in the cluster's folder, which a job inherits as its working directory, so `slurm-<id>.out`
        lands there and not in the repository."""
        kw.setdefault("env", self.env)
        kw.setdefault("cwd", self.folder)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-N", "-h", "-o", "%N %t", timeout=20).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_idle(self, timeout: float = 60) -> None:
        self.wait_for(lambda: self.node_states() == {node: "idle" for node in self.nodes},
                      "every node to be idle in sinfo", timeout)

    def sbatch(self, *args: str) -> str:
        """Submit a batch job; returns its id."""
        done = self.run("sbatch", "--parsable", *args)
        assert done.returncode == 0, f"sbatch {args} failed: {done.stderr}"
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, NodeList, ExitCode, ...); {} if it is unknown."""
        out = self.run("scontrol", "show", "job", "-o", job_id, timeout=20).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def wait_job(self, job_id: str, states: set[str], timeout: float = 60) -> dict[str, str]:
        """Until the job's JobState is one of `states`; returns its last `job()`."""
        seen: dict[str, str] = {}

        def reached() -> bool:
            seen.update(self.job(job_id))
            return seen.get("JobState") in states

        try:
            self.wait_for(reached, f"job {job_id} to reach {sorted(states)}", timeout)
        except AssertionError as e:
            raise AssertionError(f"job {job_id} last seen as {seen}\n{e}") from None
        return seen

    def alive(self) -> dict[str, int]:
        """The pids of our daemons still running."""
        return {name: proc.pid for name, proc in self.procs.items() if proc.poll() is None}

    def log_tails(self) -> str:
        return "\n".join(f"--- {name}: {path}\n{tail(path)}" for name, path in self.logs.items())

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {name: proc.returncode for name, proc in self.procs.items() if proc.poll() is not None}
            if dead and not self.stopped:
                raise AssertionError(f"Slurm daemons exited {dead} while waiting for {what}:\n{self.log_tails()}")
            if condition():
                return
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.log_tails()}")

    def stop(self) -> None:
        """Cancel what still runs, then stop every daemon we started by its pid: slurmd, slurmctld, munged last
        (the others need it to authenticate until they are down)."""
        if self.stopped:
            return
        self.stopped = True
        atexit.unregister(self.stop)
        try:
            if "slurmctld" in self.alive():
                self._cancel_all()
        finally:
            order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
            for name in order:
                if name in self.procs:
                    stop_process(self.procs[name])

    def _cancel_all(self, timeout: float = 45) -> None:
        """scancel every job, then wait until no job and no job step (its slurmstepd, which is not our child and
        outlives slurmd) is left. Beyond KillWait, Slurm has SIGKILLed them."""
        try:
            self.run("scancel", "--full", "--user", str(os.geteuid()), timeout=20)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and (self._steps_left() or self._jobs_left()):
                time.sleep(0.3)
        except subprocess.TimeoutExpired:
            pass  # a wedged slurmctld: stopping the daemons is what matters now

    def _jobs_left(self) -> bool:
        # squeue's default states: pending, running, suspended, completing.
        return bool(self.run("squeue", "-h", "-o", "%i", timeout=20).stdout.strip())

    def _steps_left(self) -> list[Path]:
        # slurmstepd keeps a socket `<node>_<job>.<step>` in the node's spool dir while the step lives.
        return [p for node in self.nodes for p in (self.folder / "spool" / node).glob(f"{node}_*")]


# Named apart from the fixture, so a test's `slurm_cluster` argument does not shadow the import.
@pytest.fixture(scope="module", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running two-node cluster (n1, n2 on 127.0.0.1), started once per test module. A test module uses it
    through `from slurm_cluster import slurm_cluster_fixture  # noqa: F401`."""
    ensure_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
