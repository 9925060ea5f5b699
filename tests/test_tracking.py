"""MLflow runs against a real SQLite store: the trainer's tracker, and the run a flow run owns."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptmini import tracking
from gptmini.cli.train import parse_args

import mlflow

TINY = ["--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--steps", "3",
        "--train.eval_every", "2", "--train.eval_batches", "1", "--train.ckpt_every", "10"]


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An MLflow SQLite database with its schema migrated once (the migrations take seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def store(tmp_path, monkeypatch, empty_db):
    """A SQLite tracking store with its artifacts under tmp_path; no MLflow env leaks in."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("gptmini-test", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, exp_id


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for f in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return found


@pytest.mark.slow
def test_trainer_logs_params_metrics_and_artifacts_and_ends_its_own_run(store, small_shards, tmp_path):
    from gptmini.train import main

    uri, client, exp_id = store
    out = tmp_path / "run"
    assert main([*TINY, "--data-dir", str(small_shards), "--out", str(out), "--tracking-uri", uri,
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
    assert {"plots/loss.png", "plots/lr.png", "config.toml", "summary.json"} <= files
    # The shards are the run's input; the best and final weights are its models, with their val measures.
    (given,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert json.loads(given.dataset.profile)["manifest_sha256"].startswith(given.dataset.digest)
    models = json.loads((out / "summary.json").read_text())["mlflow_models"]
    assert set(models) == {"best", "final"}
    for model_id in set(models.values()):
        model = client.get_logged_model(model_id)
        assert model.source_run_id == run.info.run_id and str(model.status) == "READY"
        assert {m.key for m in model.metrics} >= {"val_loss", "val_bpb"}
        assert {m.dataset_digest for m in model.metrics} == {given.dataset.digest}


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_diverged_run_is_marked_failed_not_left_running(store, small_shards, tmp_path):
    from gptmini.train import main

    uri, client, exp_id = store
    with pytest.raises(FloatingPointError, match="lower --lr"):
        main([*TINY, "--data-dir", str(small_shards), "--out", str(tmp_path / "run"), "--tracking-uri", uri,
              "--experiment", "gptmini-test", "--lr", "1e12", "--optim.min_lr", "0", "--optim.grad_clip", "0",
              "--train.log_every", "1"])
    (run,) = client.search_runs([exp_id])
    assert run.info.status == "FAILED"


def test_no_tracking_uri_means_no_tracker(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = parse_args([*TINY, "--data-dir", "d"])
    assert type(tracking.open_tracker(cfg, tmp_path, is_main=True)) is tracking.Tracker
    cfg = parse_args([*TINY, "--data-dir", "d", "--tracking-uri", "sqlite:///x.db"])
    assert type(tracking.open_tracker(cfg, tmp_path, is_main=False)) is tracking.Tracker  # ranks other than 0


@pytest.mark.slow
def test_training_runs_with_mlflow_absent(small_shards, tmp_path):
    """A tracking URI set on a machine without MLflow (the GPU boxes): a warning, and training goes on."""
    code = ("import sys; sys.modules['mlflow'] = None; from gptmini.train import main; "
            "sys.exit(main(sys.argv[1:]))")
    args = [*TINY, "--steps", "1", "--data-dir", str(small_shards), "--out", str(tmp_path / "run"),
            "--tracking-uri", "http://127.0.0.1:9"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mlflow is not installed" in proc.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


# The run a flow run owns


def test_flow_run_is_created_once_and_reopened_when_the_flow_run_is_retried(store):
    uri, client, _ = store
    first = tracking.open_flow_run(uri, "gptmini-test", "flow-1", {"mlflow.runName": "brave-fox", "preset": "tiny"})
    first.end("FAILED")  # the first attempt failed
    again = tracking.open_flow_run(uri, "gptmini-test", "flow-1", {"mlflow.runName": "brave-fox", "preset": "tiny"})
    assert again.run_id == first.run_id
    run = client.get_run(again.run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "brave-fox"
    assert run.data.tags["prefect.flow_run_id"] == "flow-1" and run.data.tags["preset"] == "tiny"
    other = tracking.open_flow_run(uri, "gptmini-test", "flow-2", {})
    assert other.run_id != first.run_id


def test_a_new_experiment_is_for_model_training_with_its_artifacts_in_the_given_folder(store, tmp_path):
    uri, client, _ = store
    run = tracking.open_flow_run(uri, "new-experiment", "flow-1", {}, artifact_root=tmp_path / "flow-artifacts")
    exp = client.get_experiment(run.experiment_id)
    assert exp.name == "new-experiment"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow 3's GenAI layout
    assert exp.artifact_location == (tmp_path / "flow-artifacts").as_uri()


def test_the_flow_logs_params_tags_metrics_text_and_artifacts_into_its_run(store, tmp_path):
    uri, client, _ = store
    run = tracking.open_flow_run(uri, "gptmini-test", "flow-1", {})
    secret = "https://user:hunter2@example.org/corpus.txt"
    run.log_params({"flow.sources": f'["{secret}"]', "flow.nproc": 2})
    run.log_params({"flow.nproc": 2})  # the same value again, as a retried flow run logs it
    run.set_tags({"data_manifest_sha256": "ab" * 32})
    run.log_metrics({"registered_val_loss": 4.5}, step=7)
    run.log_text('[{"mode": "greedy"}]', "samples.json")
    (tmp_path / "manifest.json").write_text("{}")
    run.log_artifact(tmp_path / "manifest.json", "data")
    logged = client.get_run(run.run_id)
    assert logged.data.params["flow.nproc"] == "2"
    assert "hunter2" not in logged.data.params["flow.sources"]
    assert logged.data.tags["data_manifest_sha256"] == "ab" * 32
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "registered_val_loss")] == [(7, 4.5)]
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"samples.json", "data"}
    assert [a.path for a in client.list_artifacts(run.run_id, "data")] == ["data/manifest.json"]


@pytest.mark.parametrize("status", ["FINISHED", "FAILED", "KILLED"])
def test_end_flow_run_ends_it_with_the_status_and_notes_the_flow_runs_state(store, status):
    uri, client, _ = store
    run = tracking.open_flow_run(uri, "gptmini-test", "flow-1", {})
    tracking.end_flow_run(uri, "gptmini-test", "flow-1", status, f"{status}: why it ended")
    ended = client.get_run(run.run_id)
    assert ended.info.status == status
    assert ended.data.tags["prefect.final_state"] == f"{status}: why it ended"


def test_end_flow_run_of_a_flow_run_without_an_mlflow_run_changes_nothing(store):
    uri, client, exp_id = store
    tracking.end_flow_run(uri, "gptmini-test", "never-started", "FAILED", "FAILED: parameters")
    tracking.end_flow_run(uri, "no-such-experiment", "never-started", "FAILED", "FAILED: parameters")
    assert client.search_runs([exp_id]) == []
    assert client.get_experiment_by_name("no-such-experiment") is None


# The run's dataset and its models (MLflow 3 LoggedModels)


def open_tracker(uri: str, tmp_path):
    cfg = parse_args([*TINY, "--data-dir", "d", "--tracking-uri", uri, "--experiment", "gptmini-test",
                      "--tracking.system_metrics", "false"])
    return tracking.MlflowTracker(uri, cfg, tmp_path / "run", flush_every_s=0.1)


def test_shard_folder_is_the_runs_training_input_with_the_manifests_sha256_and_logged_once(store, small_shards,
                                                                                            tmp_path):
    from gptmini.files import sha256_file

    uri, client, _ = store
    tracker = open_tracker(uri, tmp_path)
    tracker.log_dataset(small_shards / "manifest.json")
    tracker.log_dataset(small_shards / "manifest.json")  # a resumed training logs it again
    tracker.close("FINISHED")
    (given,) = client.get_run(tracker.run_id).inputs.dataset_inputs
    manifest = json.loads((small_shards / "manifest.json").read_text())
    sha256 = sha256_file(small_shards / "manifest.json")
    assert given.dataset.digest == sha256[:36]  # as much as MLflow keeps of a digest
    assert "embedded:python-docs" in given.dataset.name
    assert json.loads(given.dataset.source)["uri"] == str(small_shards.resolve())
    assert json.loads(given.dataset.profile) == {"train_tokens": manifest["splits"]["train"]["tokens"],
                                                 "val_tokens": manifest["splits"]["val"]["tokens"],
                                                 "manifest_sha256": sha256}
    assert {t.key: t.value for t in given.tags} == {"mlflow.data.context": "training"}


def test_the_flow_logs_the_shard_folder_as_its_runs_input_once_per_manifest(store, small_shards):
    uri, client, _ = store
    run = tracking.open_flow_run(uri, "gptmini-test", "flow-1", {})
    run.log_dataset(small_shards / "manifest.json")
    run.log_dataset(small_shards / "manifest.json")  # a retried flow run
    (given,) = client.get_run(run.run_id).inputs.dataset_inputs
    assert json.loads(given.dataset.profile)["manifest_sha256"].startswith(given.dataset.digest)


def test_log_model_makes_a_ready_logged_model_with_its_metrics_on_the_dataset_that_loads_and_generates(
        store, small_shards, tiny_weights, tmp_path, monkeypatch):
    from mlflow.entities import LoggedModelStatus

    uri, client, exp_id = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow.pyfunc.load_model's models:/ URI
    tracker = open_tracker(uri, tmp_path)
    tracker.log_dataset(small_shards / "manifest.json")
    tracker.log_metrics({"val_loss": 4.5, "val_bpb": 1.5}, step=3)  # what the trainer's evaluation logged
    model_id = tracker.log_model("best", tiny_weights, 3, {"val_loss": 4.5, "val_bpb": 1.5})
    tracker.close("FINISHED")

    model = client.get_logged_model(model_id)
    assert model.status == LoggedModelStatus.READY
    assert (model.name, model.source_run_id, model.experiment_id) == ("best", tracker.run_id, exp_id)
    assert model.params["step"] == "3" and model.tags["gptmini.folder"] == str(tiny_weights.resolve())
    digest = client.get_run(tracker.run_id).inputs.dataset_inputs[0].dataset.digest
    assert {(m.key, m.value, m.step, m.model_id, m.dataset_digest) for m in model.metrics} == {
        ("val_loss", 4.5, 3, model_id, digest), ("val_bpb", 1.5, 3, model_id, digest)}
    assert len(client.get_metric_history(tracker.run_id, "val_loss")) == 1  # no second point at step 3
    assert [o.model_id for o in client.get_run(tracker.run_id).outputs.model_outputs] == [model_id]

    pyfunc = mlflow.pyfunc.load_model(f"models:/{model_id}")
    (text,) = pyfunc.predict(["def"], params={"max_new_tokens": 4, "temperature": 0.0})
    assert text.startswith("def") and len(text) > 3


def test_a_model_mlflow_cannot_take_is_one_line_and_none_and_training_goes_on(store, tmp_path, capsys):
    from mlflow.entities import LoggedModelStatus

    uri, client, exp_id = store
    tracker = open_tracker(uri, tmp_path)
    assert tracker.log_model("final", tmp_path / "no-such-folder", 3, {"val_loss": 4.5}) is None
    tracker.close("FINISHED")
    err = capsys.readouterr().err
    assert "could not log the final model" in err and err.count("\n") == 1
    assert [m.status for m in client.search_logged_models([exp_id])] == [LoggedModelStatus.FAILED]


def test_the_no_op_tracker_keeps_no_models():
    assert tracking.Tracker().log_model("best", Path("x"), 1, {"val_loss": 1.0}) is None
