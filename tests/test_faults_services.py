"""The real services, started by infra/stack.sh with authentication on (conftest's `service_stack`), and the
faults that involve them: the deployment-serving process killed in the middle of a flow run, that flow run
retried, then cancelled. (The MLflow server stopped mid-training: test_faults_mlflow.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import prefect  # noqa: F401
import mlflow  # noqa: F401

from conftest import MLFLOW_PASSWORD, MLFLOW_USER, PREFECT_AUTH, Stack  # noqa: E402
from fault_helpers import ledger_fixture  # noqa: E402
from train_helpers import COMMON, env, wait_for  # noqa: E402
from gptmini.checkpoint import list_checkpoints  # noqa: E402
from gptmini.metrics import read_metrics, train_losses  # noqa: E402

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SERVE_KILLED = "kill -9 of the deployment-serving process mid flow run, then a retry that resumes"


@pytest.fixture(scope="module")
def ledger(request, tmp_path_factory):
    yield from ledger_fixture(request, tmp_path_factory)


@pytest.fixture
def stack(service_stack: Stack) -> Stack:
    """The session's services, started with the credentials imported above."""
    return service_stack


# Authentication (secure defaults)


def test_stack_env_hands_clients_the_credentials(stack):
    assert stack.client_env["PREFECT_API_AUTH_STRING"] == PREFECT_AUTH
    assert stack.client_env["MLFLOW_TRACKING_USERNAME"] == MLFLOW_USER
    assert stack.client_env["MLFLOW_TRACKING_PASSWORD"] == MLFLOW_PASSWORD


def test_prefect_refuses_anonymous_requests_and_admits_the_credentials(stack):
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    assert httpx.get(f"{stack.prefect_api}/health").status_code == 200  # probes stay open
    assert httpx.post(f"{stack.prefect_api}/flows/filter", json={}).status_code == 401
    assert httpx.post(f"{stack.prefect_api}/flows/filter", json={}, auth=("gptmini", "wrong")).status_code == 401
    with temporary_settings({PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
        with get_client(sync_client=True) as client:
            assert isinstance(client.read_flows(), list)


def test_mlflow_refuses_anonymous_requests_and_admits_the_credentials(stack, monkeypatch):
    import mlflow
    import requests

    search = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(f"{stack.mlflow_url}/health", timeout=30).status_code == 200
    assert requests.get(search, timeout=30).status_code == 401
    assert requests.get(search, auth=(MLFLOW_USER, "wrong-password-1"), timeout=30).status_code == 401
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    assert mlflow.MlflowClient(stack.mlflow_url).search_experiments()


def test_every_service_listens_on_127_0_0_1_only(stack):
    for service in ("prefect", "mlflow"):
        root = psutil.Process(stack.pid(service))
        sockets = [c for p in [root, *root.children(recursive=True)] for c in p.net_connections("inet")
                   if c.status == psutil.CONN_LISTEN]
        assert sockets, f"{service} listens nowhere"
        assert {c.laddr.ip for c in sockets} == {"127.0.0.1"}, (service, sockets)


def _mlflow_client(stack: Stack, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    return mlflow.MlflowClient(stack.mlflow_url)


# The deployment-serving process killed in the middle of a flow run


def _flow_run_state(stack: Stack, flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).state


def _process_alive_for(flow_run_id: str) -> bool:
    from flows.serve import live_flow_run_ids

    return flow_run_id in live_flow_run_ids()


def _demo_run_at_first_checkpoint(stack: Stack, params: dict) -> tuple[str, Path]:
    """(flow run id, run folder) of a `train-gpt/demo` run of the tiny preset with `params`, started through
    the serving process, once its first checkpoint is written."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    up = stack.sh("up", "serve")
    assert up.returncode == 0, up.stdout + up.stderr
    # The reference recipe but its preset and steps, which are the flow's parameters.
    extra = [a for i, a in enumerate(COMMON) if not {a, COMMON[i - 1]} & {"--preset", "--steps"}]
    with temporary_settings({PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("train-gpt/demo")
            flow_run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"preset": "tiny", "tokenizer": "bpe:300", "extra_args": extra, **params})
    run_id = str(flow_run.id)
    run_dir = stack.state / "runs" / run_id
    wait_for(lambda: len(list_checkpoints(run_dir)) >= 1, "the flow run's first checkpoint", timeout=400)
    return run_id, run_dir


# Over 60 s: a deployment flow run killed with its serving process, the serving process restarted, the run
# retried until it resumes, then cancelled; no cheaper level shows Prefect's and MLflow's states across a real
# crash. (A retried run that goes on to complete: test_flows' retry of a retryable ending, and test_slurm's flow.)
def test_serving_process_killed_mid_flow_run_is_crashed_retried_from_its_checkpoint_then_cancelled(
        stack, ledger, monkeypatch):
    """kill -9 of the serving process mid-training: restarting it marks the orphaned run Crashed and its
    MLflow run FAILED; `prefect flow-run retry` resumes training from the checkpoint the kill left; then
    `prefect flow-run cancel` ends the run Cancelled, its MLflow run KILLED (the flow's on_cancellation hook),
    with no torchrun or rank left training and no version registered."""
    mc = _mlflow_client(stack, monkeypatch)
    with ledger.trial(SERVE_KILLED):
        run_id, run_dir = _demo_run_at_first_checkpoint(stack, {
            "steps": 5000, "experiment": "faults-flow", "model_name": "gptmini-faults"})
        os.killpg(stack.pid("serve"), signal.SIGKILL)  # the serving process and the flow run it runs
        wait_for(lambda: not _process_alive_for(run_id), "the flow run's processes to be gone", timeout=60)
        assert _flow_run_state(stack, run_id).type.value == "RUNNING"  # what Prefect believes: the lie to fix
        killed_at = list_checkpoints(run_dir)[-1]

        up = stack.sh("up", "serve")  # its start marks the orphaned run Crashed, its MLflow run FAILED
        assert up.returncode == 0, up.stdout + up.stderr
        assert _flow_run_state(stack, run_id).type.value == "CRASHED"
        (mlflow_run,) = mc.search_runs([mc.get_experiment_by_name("faults-flow").experiment_id],
                                       f"tags.`prefect.flow_run_id` = '{run_id}'")
        assert mlflow_run.info.status == "FAILED"

        retry = subprocess.run([str(BIN / "prefect"), "flow-run", "retry", run_id], capture_output=True, text=True,
                               timeout=120, env={**env(), **stack.client_env})
        assert retry.returncode == 0, retry.stdout + retry.stderr
        resumed = f"resumed from {killed_at}"
        wait_for(lambda: any(resumed in line for line in _flow_run_logs(stack, run_id)),
                 "the retried run to resume from the killed run's checkpoint", timeout=300, poll=1)
        assert int(killed_at.name.split("_")[1]) >= 2
        assert mc.get_run(mlflow_run.info.run_id).info.status == "RUNNING"  # the same MLflow run, reopened

    cancel = subprocess.run([str(BIN / "prefect"), "flow-run", "cancel", run_id], capture_output=True, text=True,
                            timeout=120, env={**env(), **stack.client_env})
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    wait_for(lambda: _flow_run_state(stack, run_id).is_final(), "the cancelled flow run to end", timeout=120)
    assert _flow_run_state(stack, run_id).type.value == "CANCELLED"
    wait_for(lambda: not _process_alive_for(run_id), "the flow run's processes to be gone", timeout=60)
    wait_for(lambda: mc.get_run(mlflow_run.info.run_id).info.status != "RUNNING", "the MLflow run to end", timeout=60)
    assert mc.get_run(mlflow_run.info.run_id).info.status == "KILLED"
    assert not mc.search_model_versions("name='gptmini-faults'")
    losses = train_losses(read_metrics(run_dir / "metrics.jsonl"))
    assert max(losses) < 5000 and sorted(losses) == list(range(1, max(losses) + 1))  # stopped, not finished


def _flow_run_logs(stack: Stack, flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: PREFECT_AUTH}):
        with get_client(sync_client=True) as client:
            messages: list[str] = []
            while batch := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                            limit=200, offset=len(messages)):
                messages += [log.message for log in batch]
            return messages
