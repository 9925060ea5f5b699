"""The MLflow server stopped in the middle of training: a server of this module's own, started by
infra/stack.sh with authentication on as `make up` starts it, so killing it disturbs no other module's flow
runs on the session's stack."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

import mlflow

from conftest import MLFLOW_PASSWORD, MLFLOW_USER, Stack, start_stack, stop_stack
from fault_helpers import ledger_fixture
from train_helpers import env, train_cmd, wait_for
from gptmini.files import read_json
from gptmini.metrics import read_metrics, train_losses

pytestmark = pytest.mark.slow

MLFLOW_STOPPED = "MLflow server stopped in the middle of training, then restarted"
MLFLOW_DOWN = "MLflow server stopped in the middle of training, back only after it ended"
# Training goes on for seconds after the server is killed at step 2, so the trainer meets the dead server.
LONGER = ("--steps", "40")


@pytest.fixture(scope="module")
def ledger(request, tmp_path_factory):
    yield from ledger_fixture(request, tmp_path_factory)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """An MLflow server of this module's own."""
    own = start_stack(tmp_path_factory.mktemp("mlflow-state"), services=("mlflow",))
    yield own
    assert not stop_stack(own)


def _mlflow_client(stack: Stack, monkeypatch):
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
