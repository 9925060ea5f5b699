"""MLflow tracking from the trainer, against a real SQLite store."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gptmini import tracking
from gptmini.config import parse_args

pytestmark = pytest.mark.slow

TINY = ["--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--steps", "3",
        "--train.eval_every", "2", "--train.eval_batches", "1", "--train.ckpt_every", "10"]


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> Path:
    from gptmini.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("data") / "python-docs"
    prepare(PrepareConfig(sources=["embedded:python-docs"], out=out, workers=1))
    return out


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A SQLite tracking store with its artifacts under tmp_path; no MLflow env leaks in."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("gptmini-test", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, exp_id


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for f in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return found


def test_trainer_logs_params_metrics_and_artifacts_and_ends_its_own_run(store, prepared_dir, tmp_path):
    from gptmini.train import main

    uri, client, exp_id = store
    out = tmp_path / "run"
    assert main([*TINY, "--data-dir", str(prepared_dir), "--out", str(out), "--tracking-uri", uri,
                 "--experiment", "gptmini-test", "--run-name", "t1"]) == 0
    (run,) = client.search_runs([exp_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "t1"
    params = run.data.params
    assert params["model.d_model"] == "64" and params["data.seq_len"] == "16" and params["train.steps"] == "3"
    assert params["run.world_size"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")} == {2, 3}
    assert any(k.startswith("system/") for k in run.data.metrics)
    files = artifact_paths(client, run.info.run_id)
    assert {"plots/loss.png", "plots/lr.png", "config.toml", "summary.json", "final/model.safetensors",
            "final/config.json", "checkpoints/best/model.safetensors"} <= files


def test_run_owned_by_the_caller_is_logged_into_and_never_ended(store, tmp_path, monkeypatch):
    from gptmini.train import main

    uri, client, exp_id = store
    parent = client.create_run(exp_id, run_name="flow-owned")
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)  # how the Prefect flow hands its run over
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # Straight from a source this time: the trainer prepares it into OUT/data first.
    assert main([*TINY, "--sources", "embedded:python-docs", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "data" / "manifest.json").is_file()
    run = client.get_run(parent.info.run_id)
    assert run.info.status == "RUNNING"
    assert len(client.get_metric_history(parent.info.run_id, "loss")) == 3
    assert len(client.search_runs([exp_id])) == 1  # no run of its own


def test_a_diverged_run_is_marked_failed_not_left_running(store, prepared_dir, tmp_path):
    from gptmini.train import main

    uri, client, exp_id = store
    with pytest.raises(FloatingPointError, match="lower --lr"):
        main([*TINY, "--data-dir", str(prepared_dir), "--out", str(tmp_path / "run"), "--tracking-uri", uri,
              "--experiment", "gptmini-test", "--lr", "1e12", "--optim.min_lr", "0", "--optim.grad_clip", "0",
              "--train.log_every", "1"])
    (run,) = client.search_runs([exp_id])
    assert run.info.status == "FAILED"


def test_no_tracking_uri_means_no_tracker(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = parse_args([*TINY, "--data-dir", "d"])
    assert type(tracking.start(cfg, tmp_path, is_main=True)) is tracking.Tracker
    cfg = parse_args([*TINY, "--data-dir", "d", "--tracking-uri", "sqlite:///x.db"])
    assert type(tracking.start(cfg, tmp_path, is_main=False)) is tracking.Tracker  # ranks other than 0


def test_training_runs_with_mlflow_absent(prepared_dir, tmp_path):
    """A tracking URI set on a machine without MLflow (the GPU boxes): a warning, and training goes on."""
    code = ("import sys; sys.modules['mlflow'] = None; from gptmini.train import main; "
            "sys.exit(main(sys.argv[1:]))")
    args = [*TINY, "--steps", "1", "--data-dir", str(prepared_dir), "--out", str(tmp_path / "run"),
            "--tracking-uri", "http://127.0.0.1:9"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mlflow is not installed" in proc.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
