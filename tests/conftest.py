"""Fixtures shared across the suite: prepared shards, the reference training runs, the tiny model, and the
real service stack.

Markers: `slow` (end-to-end: real torchrun, servers, flow runs), `dist` (several processes through
torchrun), `gpu` (needs CUDA; skipped here). `make test` runs them all; `make test-fast` leaves out `slow`.

What is expensive is built once per session, by whichever pytest-xdist worker asks first, behind a file lock in
the folder the workers share: the shards, the reference runs and the service stack (Prefect and MLflow
servers; `stack.sh up` adds the serving process and the model server). The controller stops the stack when
the session ends, with `stack.sh down`, and fails the session if a service outlives it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# One intra-op thread in every test process and everything it starts (trainers, servers, CLIs), unless the
# caller chose: `make test` runs a worker per core, and their subprocesses beside them, so a second OpenMP thread
# only spins against another process (the gate test: 71 s with two threads on the loaded machine, 22 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads once)
from filelock import FileLock  # noqa: E402

from gptmini.config import model_preset
from gptmini.data.prepare import PrepareConfig, prepare
from gptmini.files import write_json
from gptmini.model import GPTOSSMini
from gptmini.weights import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# The order in which pytest-xdist hands out modules: the ones that take minutes first, so the short ones fill in
# around them rather than one long module running alone at the end. Each worker is sent two modules ahead (the
# third is queued behind the stack group): a short one goes third. test_multinode builds the reference runs
# while the stack group's worker starts the stack.
SLOWEST_FIRST = ("test_flows_stack", "test_retrain_stack", "test_faults_services", "test_multinode",
                 "test_architecture", "test_flows", "test_slurm", "test_faults_mlflow", "test_faults", "test_train",
                 "test_gpu_run", "test_parallel", "test_bench", "test_workers", "test_notebook", "test_api")
# The modules that drive the stack's serving process and model server (deployment runs, the serving process
# killed, `stack.sh up`): pytest-xdist hands them to one worker as one unit, so a kill never pulls the serving
# process from under another module's deployment run. Modules that only use the two servers run anywhere.
STACK_GROUP = ("test_faults_services", "test_flows_stack", "test_retrain_stack")
# Skips that are expected on this kind of machine; any other skip fails the session (a broken install must not
# pass as skipped tests).
ALLOWED_SKIPS = ("no CUDA device here", "llama-cpp-python is not installed", "llama.cpp's converter is not at")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` spreads whole modules over pytest-xdist workers (`--dist loadfile`: a module's fixtures
    are built once), in SLOWEST_FIRST's order."""
    no_cuda = pytest.mark.skip(reason="no CUDA device here; the CUDA path runs on the GPU machine")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile`, with the modules of STACK_GROUP as one unit of work, handed out in collection order
    (SLOWEST_FIRST) rather than by number of tests."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False

    class StackGroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "stack-group" if Path(module).stem in STACK_GROUP else module

    return StackGroupScheduling(config, log)


_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collects every skip, in the controller too (pytest-xdist replays the workers' reports there)."""
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            _skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    pytest_runtest_logreport(report)  # a module skipped whole at import


_outlived: list[str] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return
    # The controller, after every worker is done: the session's stack goes down as a user's does.
    record = session.config._tmp_path_factory.getbasetemp() / STACK_RECORD
    if record.exists():
        _outlived.extend(stop_stack(Stack(**json.loads(record.read_text()))))
    if _skips or _outlived:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _skips:
        terminalreporter.section("skips outside the allowlist (conftest.ALLOWED_SKIPS): the session fails")
        for line in _skips:
            terminalreporter.line(line)
    if _outlived:
        terminalreporter.section("`infra/stack.sh down` left services running: the session fails")
        for line in _outlived:
            terminalreporter.line(line)


def build_once(shared: Path, name: str, build: Callable[[Path], None]) -> Path:
    """`shared/name`, built by `build(path)` by whichever worker gets here first; the others wait and reuse it."""
    out = shared / name
    with FileLock(str(out) + ".lock"):
        if not (shared / f"{name}.done").exists():
            shutil.rmtree(out, ignore_errors=True)
            build(out)
            (shared / f"{name}.done").touch()
    return out


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A folder every pytest-xdist worker of this session sees (the parent of their own base temp folders)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def prepared_shards(shared_dir: Path) -> Path:
    """The embedded corpus (CPython's docs) as cl100k_base token shards, prepared once for the whole run."""
    return build_once(shared_dir, "python-docs", lambda out: prepare(PrepareConfig(
        sources=["embedded:python-docs"], out=out, workers=1, cache_dir=shared_dir / "cache")))


@pytest.fixture(scope="session")
def small_shards(shared_dir: Path) -> Path:
    """The embedded corpus under a 300-id BPE trained on its train split: the shards of every end-to-end
    training where the tokenizer is not what is tested. The tiny preset's checkpoint is then 3 MB with its
    optimizer state, where cl100k's 100,352-row embedding makes it 80 MB."""
    return build_once(shared_dir, "python-docs-bpe300", lambda out: prepare(PrepareConfig(
        sources=["embedded:python-docs"], out=out, tokenizer="bpe:300", workers=1, cache_dir=shared_dir / "cache")))


@pytest.fixture(scope="session")
def reference_runs(small_shards: Path, shared_dir: Path) -> dict[str, Path]:
    """The uninterrupted runs of train_helpers' recipe that the training, fault and two-node tests compare
    against: '1p' (one process, 2x accumulation), 'ddp' and 'fsdp' (2 ranks). All three see the same 4 windows
    per step (the sampler deals rank r every world_size-th window), so their weights agree."""
    from train_helpers import run_to_end, train_cmd

    def build(root: Path) -> None:
        for name, (nproc, extra) in REFERENCE.items():
            run_to_end(train_cmd(small_shards, root / name, *extra, nproc=nproc))

    root = build_once(shared_dir, "reference-runs", build)
    return {name: root / name for name in REFERENCE}


REFERENCE = {"1p": (None, ()), "ddp": (2, ("--parallel", "ddp")), "fsdp": (2, ("--parallel", "fsdp"))}


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved weights folder of the tiny preset at its random init (seed 0): something to load, serve,
    register or export."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "weights"
    save_pretrained(GPTOSSMini(model_preset("tiny")), folder)
    return folder


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: on a shared 2-core machine, intra-op threads cost far more than they give (20 greedy
    tokens: 0.08 s on one thread, up to 4 s on two under load). Request it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One secret per session: the controller draws it, and the workers it starts inherit it with its environment.
SECRET = os.environ.setdefault("GPTMINI_TEST_SECRET", secrets.token_hex(16))


def _derived(purpose: str, n: int) -> str:
    return hashlib.sha256(f"{SECRET}:{purpose}".encode()).hexdigest()[:n]


PREFECT_AUTH = f"gptmini:{_derived('prefect', 16)}"
MODEL_API_KEY = _derived("model", 24)
MLFLOW_USER, MLFLOW_PASSWORD = "admin", _derived("mlflow", 20)
STACK_RECORD = "service-stack.json"  # in the folder the workers share


@dataclass
class Stack:
    state: Path
    env: dict[str, str]  # what stack.sh runs with
    client_env: dict[str, str]  # what `stack.sh env` tells a client: URLs and credentials
    prefect_api: str
    mlflow_url: str

    def __post_init__(self) -> None:
        self.state = Path(self.state)

    @property
    def model_url(self) -> str:
        return f"http://127.0.0.1:{self.env['GPTMINI_MODEL_PORT']}"

    def sh(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "infra" / "stack.sh"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def pid(self, service: str) -> int:
        return int((self.state / "pids" / f"{service}.pid").read_text())


def start_stack(state: Path, services: tuple[str, ...] = ("prefect", "mlflow")) -> Stack:
    """`infra/stack.sh up` of `services`, side by side, in `state`, with authentication on (Prefect, MLflow,
    and the model server's API key) and free ports on 127.0.0.1."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    run_env = {**base, "GPTMINI_STATE": str(state), "GPTMINI_BIN": str(BIN),
               "GPTMINI_PREFECT_PORT": str(free_port()), "GPTMINI_MLFLOW_PORT": str(free_port()),
               "GPTMINI_RUNNER_PORT": str(free_port()), "GPTMINI_MODEL_PORT": str(free_port()),
               "GPTMINI_MODEL_POLL_INTERVAL": "2", "GPTMINI_CACHE_DIR": str(state / "cache"),
               "GPTMINI_PREFECT_AUTH": PREFECT_AUTH, "GPTMINI_MLFLOW_AUTH": f"{MLFLOW_USER}:{MLFLOW_PASSWORD}",
               "GPTMINI_API_KEY": MODEL_API_KEY,
               "GPTMINI_START_TIMEOUT": "300",  # a fresh database's migrations on a busy 2-core machine
               "PREFECT_RUNNER_POLL_FREQUENCY": "2"}  # the serving process picks a (retried) run up sooner
    script = str(ROOT / "infra" / "stack.sh")
    ups = [subprocess.Popen([script, "up", name], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for name in services]
    for up in ups:
        out, _ = up.communicate(timeout=300)
        assert up.returncode == 0, out
    exports = subprocess.run([script, "env"], env=run_env, capture_output=True, text=True).stdout
    client_env = dict(kv.split("=", 1) for kv in shlex.split(exports)[1:])
    return Stack(str(state), run_env, client_env, client_env["PREFECT_API_URL"], client_env["MLFLOW_TRACKING_URI"])


def stop_stack(stack: Stack) -> list[str]:
    """`infra/stack.sh down`; what it left: a line per service whose process still runs (or the failure)."""
    pids = {p.stem: int(p.read_text()) for p in (stack.state / "pids").glob("*.pid")}
    down = subprocess.run([str(ROOT / "infra" / "stack.sh"), "down"], env=stack.env, capture_output=True,
                          text=True, timeout=120)
    left = [f"stack.sh down exited {down.returncode}: {down.stderr.strip()}"] if down.returncode else []
    left += [f"pid file {p} still there" for p in (stack.state / "pids").glob("*.pid")]
    for name, pid in pids.items():
        status = Path(f"/proc/{pid}/status")
        if status.exists() and "zombie" not in status.read_text():
            left.append(f"{name}: pid {pid} still running")
    return left


@pytest.fixture(scope="session")
def service_stack(shared_dir: Path) -> Stack:
    """The real services as `make up` starts them (infra/stack.sh), with authentication on: a Prefect server
    and an MLflow server on 127.0.0.1, in a state folder every worker shares, started once for the session by
    the first worker that asks (the others reuse them); test_flows_stack adds the serving process and the
    model server. The controller stops them all when the session ends (pytest_sessionfinish)."""
    record = shared_dir / STACK_RECORD
    with FileLock(str(record) + ".lock"):
        if not record.exists():
            stack = start_stack(shared_dir / "stack-state")
            write_json(record, {**dataclasses.asdict(stack), "state": str(stack.state)})
    return Stack(**json.loads(record.read_text()))


@dataclass
class Pipeline:
    """In-process flow runs against the session's servers."""

    stack: Stack
    state: Path  # this module's GPTMINI_STATE: its shards, runs and cached task results
    tracking_uri: str


@pytest.fixture(scope="module")
def pipeline(service_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """Flows run in this process as from a user's shell after `eval "$(infra/stack.sh env)"`: the Prefect
    server's URL and auth string, the MLflow server's URL and credentials; a state folder of the module's own.
    Each module registers under model names of its own, so the stack's model server (following
    `models:/gptmini@production`) and the other modules never see its versions."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**service_stack.client_env, "GPTMINI_STATE": str(root / "state"),
                           "GPTMINI_CACHE_DIR": str(root / "cache")}.items():
            mp.setenv(key, value)
        with temporary_settings({PREFECT_API_URL: service_stack.prefect_api, PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
            yield Pipeline(service_stack, root / "state", service_stack.mlflow_url)
