"""The real local stack (infra/stack.sh): a Prefect server, an MLflow server and the serving process, then
`prefect deployment run train-gpt/demo --watch` from a plain shell, as a user runs it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prefect")
pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    env = {**os.environ, "GPTMINI_STATE": str(state), "GPTMINI_BIN": str(BIN),
           "GPTMINI_PREFECT_PORT": str(free_port()), "GPTMINI_MLFLOW_PORT": str(free_port()),
           "GPTMINI_RUNNER_PORT": str(free_port()), "GPTMINI_CACHE_DIR": str(state / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)

    def sh(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "infra" / "stack.sh"), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    up = sh("up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        exports = sh("env").stdout.split()[1:]  # "export A=1 B=2 ..."
        env.update(dict(kv.split("=", 1) for kv in exports))
        yield state, env, sh
    finally:
        sh("down")


def pids(state: Path) -> dict[str, str]:
    return {p.stem: p.read_text().strip() for p in (state / "pids").glob("*.pid")}


@pytest.mark.slow
def test_up_is_idempotent_and_health_checked(stack):
    state, env, sh = stack
    before = pids(state)
    assert set(before) == {"prefect", "mlflow", "serve"}
    again = sh("up")
    assert again.returncode == 0 and again.stdout.count("already running") == 3
    assert pids(state) == before
    assert sh("status").stdout.count("healthy") == 3
    assert {"prefect.log", "mlflow.log", "serve.log"} <= {p.name for p in (state / "logs").iterdir()}


@pytest.mark.slow
def test_deployment_run_from_a_shell_registers_a_version_that_generate_loads(stack):
    state, env, _ = stack
    run = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "train-gpt/demo", "--param", "preset=tiny", "--param", "steps=2",
         "--param", "max_new_tokens=4", "--param", 'prompts=["def"]', "--watch", "--watch-timeout", "400"],
        env=env, capture_output=True, text=True, timeout=450, cwd=state)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    listing = subprocess.run([str(BIN / "gptmini"), "promote", "--list"], env=env, capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert "production" in listing.stdout and listing.stdout.startswith("v1")
    sample = subprocess.run([str(BIN / "gptmini"), "generate", "--model", "models:/gptmini@production", "--prompt",
                             "def", "--max-new-tokens", "4", "--temperature", "0"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert sample.returncode == 0 and sample.stdout.startswith("def"), sample.stderr


@pytest.mark.slow
def test_down_stops_every_service(stack):
    state, _, sh = stack
    started = pids(state).values()
    assert sh("down").returncode == 0
    assert not pids(state)
    for pid in started:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
