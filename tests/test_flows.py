"""The Prefect pipeline on a real Prefect test server (prefect_test_harness), a real SQLite MLflow store,
real `gptmini prepare` and real torchrun training of the tiny preset.

One module-scoped pair of flow runs backs the end-to-end tests (each flow run costs tens of seconds on 2
cores): the first registers v1 and promotes it (no production yet); the second, on the same sources,
hits the cached data tasks, registers v2 and goes through the champion/challenger gate.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("prefect")
mlflow = pytest.importorskip("mlflow")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from gptmini import registry  # noqa: E402

TINY = {"preset": "tiny", "steps": 2, "prompts": ["def"], "max_new_tokens": 4}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Prefect test server + SQLite MLflow store + state folder, all in tmp; yields the tracking URI."""
    root = tmp_path_factory.mktemp("stack")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTMINI_STATE", str(root / "state"))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("GPTMINI_CACHE_DIR", str(root / "cache"))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: root / "prefect-results"}), prefect_test_harness():
            mc = registry.client(uri)
            mc.create_experiment("gptmini", artifact_location=(root / "artifacts").as_uri())
            yield uri


def task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}  # "download-3e1" -> "download"


def mlflow_run_for(mc, flow_run_id):
    exp = mc.get_experiment_by_name("gptmini")
    runs = mc.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1, f"expected one MLflow run for flow run {flow_run_id}, found {len(runs)}"
    return runs[0]


@pytest.fixture(scope="module")
def two_runs(stack):
    from flows.train_gpt import train_gpt

    states = [train_gpt(**TINY, return_state=True) for _ in range(2)]
    return [(s.state_details.flow_run_id, s) for s in states]


@pytest.mark.slow
def test_flow_registers_a_version_that_traces_back_to_its_run_and_data(stack, two_runs):
    (flow_run_id, state), _ = two_runs
    assert state.is_completed(), state.message
    result = state.result()
    mc = registry.client(stack)
    mv = mc.get_model_version("gptmini", result["version"])
    run = mlflow_run_for(mc, flow_run_id)
    assert mv.run_id == run.info.run_id == result["mlflow_run_id"]
    assert mv.tags["data_manifest_sha256"] == run.data.tags["data_manifest_sha256"]
    assert float(mv.tags["val_loss"]) == pytest.approx(result["val_loss"], rel=1e-5)
    assert mv.tags["git_commit"]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "2"  # the trainer's params, logged into the flow's run
    assert "val_loss" in run.data.metrics
    artifacts = {a.path for a in mc.list_artifacts(run.info.run_id)}
    assert {"data", "model", "samples.json"} <= artifacts


@pytest.mark.slow
def test_first_version_is_promoted_and_aliases_follow_the_gate(stack, two_runs):
    (_, first), (_, second) = two_runs
    v1, v2 = first.result(), second.result()
    assert v1["promoted"] and v1["version"] == "1"
    assert v2["version"] == "2"
    aliases = {k: str(v) for k, v in registry.client(stack).get_registered_model("gptmini").aliases.items()}
    assert aliases["challenger"] == "2"
    # v2 is promoted exactly when it beat v1 on the same validation data.
    assert v2["promoted"] == (v2["val_loss"] < v1["val_loss"])
    assert aliases["production"] == aliases["champion"] == ("2" if v2["promoted"] else "1")
    decision = registry.client(stack).get_model_version("gptmini", "2").tags["gate.decision"]
    assert decision == ("promoted" if v2["promoted"] else "rejected")


@pytest.mark.slow
def test_rerun_hits_the_cached_data_tasks(two_runs):
    (first_id, _), (second_id, _) = two_runs
    first, second = task_states(first_id), task_states(second_id)
    assert first["download"] == first["tokenize"] == "Completed"
    assert second["download"] == second["tokenize"] == "Cached"
    assert second["train"] == "Completed"


@pytest.mark.slow
def test_report_artifact_has_metrics_samples_and_registry_links(two_runs):
    (flow_run_id, _), _ = two_runs
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    report = next(a for a in artifacts if a.key == "train-gpt-report")
    assert "val_loss" in report.data and "gptmini v1" in report.data
    assert "greedy" in report.data and "top-k 40" in report.data
    assert "promoted to production" in report.data


@pytest.mark.slow
def test_failing_training_fails_the_flow_and_the_mlflow_run(stack, two_runs):
    from flows.train_gpt import train_gpt

    state = train_gpt(**TINY, extra_args=["--no-such-flag"], train_retries=0, return_state=True)
    assert state.is_failed()
    assert "rejected its configuration" in state.message or "rejected its configuration" in str(
        state.result(raise_on_failure=False))
    run = mlflow_run_for(registry.client(stack), state.state_details.flow_run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["prefect.final_state"].startswith("FAILED")


def our_trainers(state_dir: str) -> list[tuple[int, Path]]:
    """(pid, run folder) of the `gptmini.train` workers that this test's flow started: processes that
    descend from this one and write under its state folder (never another job's training)."""
    def parent(pid: int) -> int:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])

    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
            if "gptmini.train" not in argv or "torch.distributed.run" in argv or "--out" not in argv:
                continue
            out = argv[argv.index("--out") + 1]
            pid = ancestor = int(proc.name)
            while ancestor > 1 and ancestor != os.getpid():
                ancestor = parent(ancestor)
        except (OSError, ValueError, IndexError):
            continue
        if ancestor == os.getpid() and out.startswith(state_dir):
            found.append((pid, Path(out)))
    return found


@pytest.mark.slow
def test_preempted_training_is_retried_and_resumes_from_its_checkpoint(stack):
    """SIGTERM the trainer once it has logged step 2 (a preemption: it checkpoints and exits 0); the train
    task fails as retryable, Prefect retries it, and the retry resumes from that checkpoint."""
    from flows.train_gpt import train_gpt

    stop, sent = threading.Event(), []

    def preempt_once() -> None:
        while not stop.is_set() and not sent:
            for pid, run_dir in our_trainers(os.environ["GPTMINI_STATE"]):
                metrics = run_dir / "metrics.jsonl"
                if metrics.exists() and '"step": 2,' in metrics.read_text():
                    os.kill(pid, signal.SIGTERM)
                    sent.append(pid)
            time.sleep(0.1)

    watcher = threading.Thread(target=preempt_once, daemon=True)
    watcher.start()
    try:
        state = train_gpt(**{**TINY, "steps": 8}, train_retries=1, return_state=True)
    finally:
        stop.set()
        watcher.join()
    assert sent, "the trainer finished before it could be preempted"
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    text = "\n".join(log.message for log in logs)
    assert "SIGTERM: saved checkpoint at step" in text
    assert "training stopped early (preempted" in text
    assert "resumed from" in text
    summary = json.loads((Path(state.result()["run_dir"]) / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8


def test_bad_flow_parameters_fail_before_any_task(stack):
    from flows.train_gpt import train_gpt

    state = train_gpt(preset="huge", return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="preset 'huge' is unknown"):
        state.result()
    state = train_gpt(preset="tiny", sources=["ftp://example.org/x"], return_state=True)
    with pytest.raises(ValueError, match="not wikipedia:TITLE"):
        state.result()


def test_deployments_are_registered_with_schedule_and_overridable_parameters(stack):
    from prefect.deployments import run_deployment

    from flows.serve import RETRAIN_CRON, deployments

    for deployment in deployments():
        deployment.apply()
    with get_client(sync_client=True) as client:
        demo = client.read_deployment_by_name("train-gpt/demo")
        retrain = client.read_deployment_by_name("train-gpt/retrain")
        promote = client.read_deployment_by_name("promote-model/promote")
    assert demo.parameters["preset"] == "demo" and demo.parameters["sources"] == ["embedded:python-docs"]
    assert [s.schedule.cron for s in retrain.schedules] == [RETRAIN_CRON]
    assert retrain.parameters["promotion"] == "if-better"
    assert promote.entrypoint == "flows.promote.promote_model"

    # What `prefect deployment run train-gpt/demo --param steps=7` sends (timeout=0: only schedule it).
    run = run_deployment("train-gpt/demo", parameters={"steps": 7}, timeout=0)
    assert run.parameters["steps"] == 7
    assert run.deployment_id == demo.id
    with get_client(sync_client=True) as client:
        client.delete_flow_run(run.id)
    with pytest.raises(Exception, match="steps"):
        run_deployment("train-gpt/demo", parameters={"steps": "many"}, timeout=0)


def test_report_keeps_sample_text_inside_its_table_cell():
    from flows.train_gpt import report

    md = report({"val_loss": 1.5}, {"steps": 2}, [{"mode": "greedy", "prompt": "a|b", "text": "x\ny|z"}],
                {"promote": False, "reason": "r"}, {"run": "r1", "version": "v1"}, "/runs/x", "ab", "3", "gptmini")
    assert "| val_loss | 1.5000 |" in md and "not promoted" in md
    row = next(line for line in md.splitlines() if line.startswith("| greedy"))
    assert row.count("|") - row.count("\\|") == 4  # three cells, whatever the text holds


def test_promote_model_flow_moves_production_and_rejects_an_unknown_version(stack, tmp_path):
    from flows.promote import promote_model
    from gptmini.model import GPTOSSMini, ModelConfig
    from gptmini.weights import save_pretrained

    mc = registry.client(stack)
    save_pretrained(GPTOSSMini(ModelConfig.from_preset("tiny")), tmp_path / "w")
    run = mc.create_run(mc.get_experiment_by_name("gptmini").experiment_id)
    mv = registry.log_model_version(mc, run.info.run_id, tmp_path / "w", {"val_loss": "9.0"}, name="promote-test")
    result = promote_model(version=int(mv.version), model_name="promote-test")
    assert result["promote"]
    aliases = {k: str(v) for k, v in mc.get_registered_model("promote-test").aliases.items()}
    assert aliases["production"] == aliases["champion"] == str(mv.version)

    state = promote_model(version=int(mv.version) + 5, model_name="promote-test", return_state=True)
    assert state.is_failed()
    with pytest.raises(registry.RegistryError, match="has no version"):
        state.result()
