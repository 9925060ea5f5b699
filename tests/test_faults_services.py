"""The real services, started by infra/stack.sh with authentication on (conftest's `service_stack`), and the
faults that involve them: the MLflow server stopped in the middle of training, and the deployment-serving
process killed in the middle of a flow run, then that flow run retried.
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
from train_helpers import COMMON, env, train_cmd, wait_for  # noqa: E402
from gptmini.checkpoint import list_checkpoints  # noqa: E402
from gptmini.files import read_json  # noqa: E402
from gptmini.metrics import read_metrics, train_losses  # noqa: E402

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MLFLOW_STOPPED = "MLflow server stopped in the middle of training, then restarted"
MLFLOW_DOWN = "MLflow server stopped in the middle of training, back only after it ended"
SERVE_KILLED = "kill -9 of the deployment-serving process mid flow run, then a retry"
# Training goes on for seconds after the server is killed at step 2, so the trainer meets the dead server.
LONGER = ("--steps", "40")


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


# The MLflow server stopped in the middle of training


def _mlflow_client(stack: Stack, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    return mlflow.MlflowClient(stack.mlflow_url)


def test_mlflow_stopped_mid_training_loses_no_metric(stack, small_shards, ledger, tmp_path, monkeypatch):
    """Training logs to MLflow through a URI with the password in it; the server is killed at step 2 and
    started again later: training goes on, every metric reaches MLflow, the run ends FINISHED, and the
    password shows up in no param and no output."""
    out = tmp_path / "run"
    uri_with_password = stack.mlflow_url.replace("http://", f"http://{MLFLOW_USER}:{MLFLOW_PASSWORD}@")
    log = tmp_path / "train.log"
    with ledger.trial(MLFLOW_STOPPED):
        with open(log, "wb") as f:
            cmd = train_cmd(small_shards, out, *LONGER, "--tracking-uri", uri_with_password, "--experiment", "faults")
            proc = subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: 2 in train_losses(read_metrics(out / "metrics.jsonl")), "step 2", proc=proc)
            os.killpg(stack.pid("mlflow"), signal.SIGKILL)
            wait_for(lambda: "MLflow logging failed" in log.read_text(errors="replace"),
                     "the trainer to meet the dead server", proc=proc)
            os.killpg(proc.pid, signal.SIGSTOP)  # hold training while the server comes back (~10-20 s)
            up = stack.sh("up", "mlflow")
            assert up.returncode == 0, up.stdout + up.stderr
            os.killpg(proc.pid, signal.SIGCONT)
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        output = log.read_text()
        assert MLFLOW_PASSWORD not in output
        assert not (out / "mlflow_unsent.jsonl").exists(), "metrics were dropped"

        mc = _mlflow_client(stack, monkeypatch)
        run = mc.get_run(read_json(out / "mlflow_run.json")["run_id"])
        assert run.info.status == "FINISHED"
        logged = {m.step: m.value for m in mc.get_metric_history(run.info.run_id, "loss")}
        assert logged == train_losses(read_metrics(out / "metrics.jsonl")), "a loss is missing or wrong in MLflow"
        val = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "val"]
        assert len(mc.get_metric_history(run.info.run_id, "val_loss")) >= len(val)
        assert run.data.params["tracking.tracking_uri"] == stack.mlflow_url.replace("http://", "http://***@")
        assert not [k for k, v in run.data.params.items() if MLFLOW_PASSWORD in v]
        assert MLFLOW_PASSWORD not in (out / "config.toml").read_text()


def test_mlflow_down_until_training_ends_leaves_a_clear_account(stack, small_shards, ledger, tmp_path, monkeypatch):
    """The server dies at step 2 and is back only after training ended: what MLflow never got is in
    RUN/mlflow_unsent.jsonl and counted on stderr; MLflow's part plus that file hold every step's loss."""
    import json

    out = tmp_path / "run"
    log = tmp_path / "train.log"
    with ledger.trial(MLFLOW_DOWN):
        with open(log, "wb") as f:
            cmd = train_cmd(small_shards, out, *LONGER, "--tracking-uri", stack.mlflow_url, "--experiment", "faults")
            credentials = env(MLFLOW_TRACKING_USERNAME=MLFLOW_USER, MLFLOW_TRACKING_PASSWORD=MLFLOW_PASSWORD)
            proc = subprocess.Popen(cmd, env=credentials, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: 2 in train_losses(read_metrics(out / "metrics.jsonl")), "step 2", proc=proc)
            os.killpg(stack.pid("mlflow"), signal.SIGKILL)
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]  # training went on to the end
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            up = stack.sh("up", "mlflow")
            assert up.returncode == 0, up.stdout + up.stderr
        output = log.read_text()
        unsent = [json.loads(line) for line in (out / "mlflow_unsent.jsonl").read_text().splitlines()]
        assert f"took {len(unsent)} items fewer than sent" in output, output[-2000:]
        mc = _mlflow_client(stack, monkeypatch)
        run_id = read_json(out / "mlflow_run.json")["run_id"]
        sent = {m.step: m.value for m in mc.get_metric_history(run_id, "loss")}
        dropped = {m["step"]: m["value"] for m in unsent if m.get("key") == "loss"}
        assert not set(sent) & set(dropped)
        assert {**sent, **dropped} == train_losses(read_metrics(out / "metrics.jsonl"))


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


# Over 60 s: a whole deployment flow run, killed with its serving process, the serving process restarted and
# the run retried to its end; no cheaper level shows Prefect's and MLflow's states across a real crash.
def test_serving_process_killed_mid_flow_run_then_retried_resumes(stack, ledger, monkeypatch):
    with ledger.trial(SERVE_KILLED):
        run_id, run_dir = _demo_run_at_first_checkpoint(stack, {
            "steps": 8, "prompts": ["def"], "max_new_tokens": 4, "promotion": "always",
            "experiment": "faults-flow", "model_name": "gptmini-faults"})
        os.killpg(stack.pid("serve"), signal.SIGKILL)  # the serving process and the flow run it runs
        wait_for(lambda: not _process_alive_for(run_id), "the flow run's processes to be gone", timeout=60)
        assert _flow_run_state(stack, run_id).type.value == "RUNNING"  # what Prefect believes: the lie to fix
        killed_at = [p.name for p in list_checkpoints(run_dir)]

        up = stack.sh("up", "serve")  # its start marks the orphaned run Crashed, its MLflow run FAILED
        assert up.returncode == 0, up.stdout + up.stderr
        assert _flow_run_state(stack, run_id).type.value == "CRASHED"
        mc = _mlflow_client(stack, monkeypatch)
        exp = mc.get_experiment_by_name("faults-flow")
        (mlflow_run,) = mc.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{run_id}'")
        assert mlflow_run.info.status == "FAILED"

        retry = subprocess.run([str(BIN / "prefect"), "flow-run", "retry", run_id], capture_output=True, text=True,
                               timeout=120, env={**env(), **stack.client_env})
        assert retry.returncode == 0, retry.stdout + retry.stderr
        wait_for(lambda: _flow_run_state(stack, run_id).is_final(), "the retried flow run to finish", timeout=500)
        state = _flow_run_state(stack, run_id)
        assert state.type.value == "COMPLETED", state.message

        mlflow_run = mc.get_run(mlflow_run.info.run_id)
        assert mlflow_run.info.status == "FINISHED"
        versions = mc.search_model_versions("name='gptmini-faults'")
        assert [v.tags.get("prefect.flow_run_id") for v in versions] == [run_id]
        losses = train_losses(read_metrics(run_dir / "metrics.jsonl"))
        assert sorted(losses) == list(range(1, 9))
        # The retry resumed from the checkpoint the kill left, rather than starting over.
        assert int(killed_at[-1].split("_")[1]) >= 2
        assert any(f"resumed from {run_dir / 'checkpoints' / killed_at[-1]}" in line
                   for line in _flow_run_logs(stack, run_id))


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


# About 60 s: a deployment flow run started through the serving process and cancelled mid-training.
def test_cancelled_flow_run_ends_its_mlflow_run_killed_and_leaves_no_trainer(stack, monkeypatch):
    """`prefect flow-run cancel` while training: the flow run ends Cancelled, its MLflow run KILLED (the
    flow's on_cancellation hook), and no torchrun or rank is left training."""
    run_id, run_dir = _demo_run_at_first_checkpoint(stack, {
        "steps": 500, "experiment": "faults-cancel", "model_name": "gptmini-cancel"})

    cancel = subprocess.run([str(BIN / "prefect"), "flow-run", "cancel", run_id], capture_output=True, text=True,
                            timeout=120, env={**env(), **stack.client_env})
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    wait_for(lambda: _flow_run_state(stack, run_id).is_final(), "the cancelled flow run to end", timeout=120)
    assert _flow_run_state(stack, run_id).type.value == "CANCELLED"
    wait_for(lambda: not _process_alive_for(run_id), "the flow run's processes to be gone", timeout=60)
    mc = _mlflow_client(stack, monkeypatch)
    (mlflow_run,) = mc.search_runs([mc.get_experiment_by_name("faults-cancel").experiment_id],
                                   f"tags.`prefect.flow_run_id` = '{run_id}'")
    wait_for(lambda: mc.get_run(mlflow_run.info.run_id).info.status != "RUNNING", "the MLflow run to end", timeout=60)
    assert mc.get_run(mlflow_run.info.run_id).info.status == "KILLED"
    assert not mc.search_model_versions("name='gptmini-cancel'")
    assert max(train_losses(read_metrics(run_dir / "metrics.jsonl"))) < 500  # stopped, not finished
