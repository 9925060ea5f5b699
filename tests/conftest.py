"""Fixtures shared across the suite: prepared shards, the tiny model, and the real service stack.

Markers: `slow` (end-to-end: real torchrun, servers, flow runs), `dist` (several processes through
torchrun), `gpu` (needs CUDA; skipped here). `make test` runs them all; `make test-fast` leaves out `slow`.
"""
from __future__ import annotations

import os
import secrets
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from gptmini.config import model_preset
from gptmini.data.prepare import PrepareConfig, prepare
from gptmini.model import GPTOSSMini
from gptmini.weights import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# The modules that take minutes (trained baselines, flow runs, the service stack), longest first.
SLOWEST_FIRST = ("test_train", "test_faults_services", "test_flows", "test_slurm", "test_flows_stack", "test_multinode",
                 "test_workers", "test_faults")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` spreads whole modules over pytest-xdist workers (`--dist loadfile`: a module's fixtures
    are built once), handing them out in this order, so the long modules start first and the short ones fill
    in around them instead of one long module running alone at the end."""
    no_cuda = pytest.mark.skip(reason="no CUDA device here; the CUDA path runs on the GPU machine")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))


@pytest.fixture(scope="session")
def prepared_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded corpus (CPython's docs) as token shards, prepared once for the whole run."""
    out = tmp_path_factory.mktemp("data") / "python-docs"
    prepare(PrepareConfig(sources=["embedded:python-docs"], out=out, workers=1,
                          cache_dir=tmp_path_factory.mktemp("cache")))
    return out


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


PREFECT_AUTH = f"gptmini:{secrets.token_hex(8)}"
MLFLOW_USER, MLFLOW_PASSWORD = "admin", secrets.token_hex(10)


@dataclass
class Stack:
    state: Path
    env: dict[str, str]  # what stack.sh runs with
    client_env: dict[str, str]  # what `stack.sh env` tells a client: URLs and credentials
    prefect_api: str
    mlflow_url: str

    def sh(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "infra" / "stack.sh"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def pid(self, service: str) -> int:
        return int((self.state / "pids" / f"{service}.pid").read_text())


@pytest.fixture(scope="session")
def service_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real services as `make up` starts them (infra/stack.sh), with authentication on: a Prefect server
    and an MLflow server on 127.0.0.1 in a temporary state folder, started once for the session."""
    state = tmp_path_factory.mktemp("state")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    run_env = {**base, "GPTMINI_STATE": str(state), "GPTMINI_BIN": str(BIN),
               "GPTMINI_PREFECT_PORT": str(free_port()), "GPTMINI_MLFLOW_PORT": str(free_port()),
               "GPTMINI_RUNNER_PORT": str(free_port()), "GPTMINI_MODEL_PORT": str(free_port()),
               "GPTMINI_MODEL_POLL_INTERVAL": "2", "GPTMINI_CACHE_DIR": str(state / "cache"),
               "GPTMINI_PREFECT_AUTH": PREFECT_AUTH, "GPTMINI_MLFLOW_AUTH": f"{MLFLOW_USER}:{MLFLOW_PASSWORD}",
               "PREFECT_RUNNER_POLL_FREQUENCY": "2"}  # the serving process picks a (retried) run up sooner
    script = str(ROOT / "infra" / "stack.sh")
    # The two servers start side by side (each takes ~10-20 s of migrations on a fresh state folder).
    ups = [subprocess.Popen([script, "up", name], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for name in ("prefect", "mlflow")]
    try:
        for up in ups:
            out, _ = up.communicate(timeout=300)
            assert up.returncode == 0, out
        exports = subprocess.run([script, "env"], env=run_env, capture_output=True, text=True).stdout
        client_env = dict(kv.split("=", 1) for kv in shlex.split(exports)[1:])
        yield Stack(state, run_env, client_env, client_env["PREFECT_API_URL"], client_env["MLFLOW_TRACKING_URI"])
    finally:
        subprocess.run([script, "down"], env=run_env, capture_output=True, timeout=120)
