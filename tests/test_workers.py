"""Two Prefect process workers, as on two machines: each with its own PREFECT_HOME, both with the same
$GPTMINI_STATE (the shared storage folder), polling one work pool of the session's Prefect server (conftest's
`service_stack`, with authentication on).

The `prepare-data` deployment runs on worker A, then with the same parameters on worker B, which must find
the data tasks cached: their results live in the shared folder. In a worker's own PREFECT_HOME (Prefect's
default) B would miss them and run `gptmini prepare` again. The shards themselves would survive that miss
(prepare finds them up to date and rewrites nothing), so the manifest's mtime cannot tell; the task states
and the flow run's log can.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

import prefect  # noqa: F401

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId  # noqa: E402
from prefect.client.schemas.objects import FlowRun, TaskRun  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.deployments.runner import EntrypointType  # noqa: E402
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings  # noqa: E402

from conftest import PREFECT_AUTH  # noqa: E402
from flows.prepare_data import prepare_data  # noqa: E402

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
POOL = "gptmini-workers"
PARAMETERS = {"sources": ["embedded:python-docs"]}  # not a local path, so `download` is cached too
PREPARE = "-m gptmini.cli prepare"  # in the tokenize task's log when it runs prepare


class Run(NamedTuple):
    flow_run: FlowRun
    task_runs: dict[str, TaskRun]  # by task name
    log: list[str]


def clean_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "GPTMINI_"))}
    return {**base, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **extra}


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # its own session: stopping it stops the processes it started too
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_worker(queue: str, api: str, prefect_home: Path, shared_state: Path, log: Path) -> subprocess.Popen:
    env = clean_env(PREFECT_API_URL=api, PREFECT_API_AUTH_STRING=PREFECT_AUTH, PREFECT_HOME=str(prefect_home),
                    GPTMINI_STATE=str(shared_state), PREFECT_WORKER_QUERY_SECONDS="1")  # polls every second, not every 10
    return spawn([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--work-queue",
                  queue, "--name", f"worker-{queue}"], env, log)


def recorded(flow_run: FlowRun) -> Run:
    """A finished flow run's task runs and log, once the server has them all: task runs arrive as events
    and logs in batches, a moment after the flow run's final state. The flow's own last line ends its log."""
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        final = {run.name.rsplit("-", 1)[0]: run for run in task_runs if run.state and run.state.is_final()}
        flow_ended = any(log.task_run_id is None and log.message.startswith("Finished in state") for log in logs)
        if ({"download", "tokenize"} <= set(final) and flow_ended) or time.monotonic() > deadline:
            return Run(flow_run, final, [log.message for log in logs])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def runs(service_stack, tmp_path_factory) -> tuple[Path, Run, Run]:
    """(the test's folder, the run on worker A, the same parameters' run on worker B)."""
    root = tmp_path_factory.mktemp("workers")
    api = service_stack.prefect_api
    workers = []
    try:
        with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
            with get_client(sync_client=True) as client:
                client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
            workers = [start_worker(q, api, root / f"home-{q}", root / "shared", root / f"worker-{q}.log")
                       for q in ("a", "b")]
            prepare_data.to_deployment("workers", entrypoint_type=EntrypointType.MODULE_PATH).apply(
                work_pool_name=POOL)
            done = []
            for queue in ("a", "b"):  # one queue per worker: the run goes to the worker named
                flow_run = run_deployment("prepare-data/workers", parameters=PARAMETERS, work_queue_name=queue,
                                          timeout=300, poll_interval=1)
                assert flow_run.state.is_completed(), (flow_run.state,
                                                       (root / f"worker-{queue}.log").read_text()[-3000:])
                done.append(recorded(flow_run))
            yield root, *done
    finally:
        for proc in workers:
            stop(proc)


def test_second_worker_finds_the_data_tasks_cached(runs):
    _, a, b = runs
    assert (a.flow_run.work_queue_name, b.flow_run.work_queue_name) == ("a", "b")
    assert {name: run.state.name for name, run in a.task_runs.items()} == {"download": "Completed",
                                                                           "tokenize": "Completed"}
    assert {name: run.state.name for name, run in b.task_runs.items()} == {"download": "Cached",
                                                                           "tokenize": "Cached"}


def test_second_worker_does_not_run_prepare_again(runs):
    _, a, b = runs
    assert any(PREPARE in line for line in a.log)
    # B's log is there, down to the flow's last line, and its tokenize task says it used the cached result.
    assert any(line.startswith("Finished in state Completed") for line in b.log), b.log
    assert any(line.startswith("Finished in state Cached") for line in b.log), b.log
    assert not any(PREPARE in line for line in b.log)


def test_task_results_live_in_the_shared_state_not_in_a_workers_prefect_home(runs):
    """Where each worker wrote and read the data tasks' results, as the API records them: one file in the
    shared folder. In PREFECT_HOME/storage (Prefect's default) each worker would have had its own."""
    root, a, b = runs
    for name in ("download", "tokenize"):
        written, read = (Path(run.task_runs[name].state.data.storage_key) for run in (a, b))
        assert written == read and written.parent == root / "shared" / "prefect-results" and written.is_file()
    assert not [p for q in ("a", "b") for p in (root / f"home-{q}" / "storage").rglob("*") if p.is_file()]
