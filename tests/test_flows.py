"""The Prefect pipeline on the session's real servers (a Prefect server and an MLflow server with
authentication on, conftest's `pipeline`), real `gptmini prepare` and real torchrun training of the tiny preset.

One pair of flow runs backs the end-to-end tests (each costs tens of seconds on 2 cores): two identical runs
started together while the test holds the registry lock, so both reach registration at once. The first to
register finds no production version and is promoted; the second must be gated against it, and, being an
identical copy, must not be promoted. They train on a 300-id BPE (small checkpoints; the version carries the
tokenizer), through an MLflow URI that holds the password, which no log line may show. How the train task
reads a training's ending is tested on the real task with the trainer's summary.json written by a stand-in.
"""
from __future__ import annotations

import contextvars
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

import mlflow  # noqa: F401
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from conftest import MLFLOW_PASSWORD, MLFLOW_USER
from flows import tasks
from gptmini import ending, registry

TINY = {"preset": "tiny", "steps": 2, "prompts": ["def"], "max_new_tokens": 4, "tokenizer": "bpe:300"}
NAME = "flows"  # this module's registered model


@pytest.fixture(scope="module")
def stack(pipeline) -> str:
    """The tracking URI of the session's MLflow server, with this module's flows pointed at the servers."""
    return pipeline.tracking_uri


def task_runs(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run for run in runs}  # "download-3e1" -> "download"


def task_states(flow_run_id) -> dict[str, str]:
    return {name: run.state.name for name, run in task_runs(flow_run_id).items()}


def flow_run_logs(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        messages: list[str] = []
        while batch := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                        offset=len(messages)):
            messages += [log.message for log in batch]
    return messages


def mlflow_run_for(mc, flow_run_id):
    exp = mc.get_experiment_by_name("gptmini")
    runs = mc.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1, f"expected one MLflow run for flow run {flow_run_id}, found {len(runs)}"
    return runs[0]


def ours_done_sampling(model_name: str) -> set[str]:
    """The flow runs for `model_name` whose samples task has completed: the last step before the registry."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    done = set()
    for run in (r for r in runs if r.parameters.get("model_name") == model_name):
        sampled = task_runs(run.id).get("samples")
        if sampled is not None and sampled.state is not None and sampled.state.is_completed():
            done.add(str(run.id))
    return done


# Over 60 s: two flow runs end to end (BPE, training, export, evaluation, samples, registration); one pair
# proves the run's lineage, the race for the registry lock and the gate's refusal of a copy at once.
@pytest.fixture(scope="module")
def two_runs(stack):
    """[(flow run id, state)] of the identical pair, in the order they registered (v1, v2)."""
    from flows.train_gpt import train_gpt

    states = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", stack.replace("http://", f"http://{MLFLOW_USER}:{MLFLOW_PASSWORD}@"))
        mp.delenv("MLFLOW_TRACKING_USERNAME")
        mp.delenv("MLFLOW_TRACKING_PASSWORD")
        threads = [threading.Thread(target=contextvars.copy_context().run, daemon=True,
                                    args=(lambda: states.append(train_gpt(**TINY, model_name=NAME,
                                                                          return_state=True)),))
                   for _ in range(2)]
        with tasks.registry_lock():
            for thread in threads:
                thread.start()
            deadline = time.time() + 400
            while time.time() < deadline and len(sampled := ours_done_sampling(NAME)) < 2:
                assert all(t.is_alive() for t in threads), [s.message for s in states]
                time.sleep(1)
            assert len(sampled) == 2, "both runs should have reached the registry lock"
            time.sleep(2)  # both are now polling for the lock's one slot
        for thread in threads:
            thread.join(timeout=300)
    assert len(states) == 2 and all(s.is_completed() for s in states), [s.message for s in states]
    return sorted(((s.state_details.flow_run_id, s) for s in states), key=lambda r: int(r[1].result()["version"]))


@pytest.mark.slow
def test_flow_registers_a_version_that_traces_back_to_its_run_and_data(stack, two_runs):
    (flow_run_id, state), _ = two_runs
    result = state.result()
    mc = registry.client(stack)
    mv = mc.get_model_version(NAME, result["version"])
    run = mlflow_run_for(mc, flow_run_id)
    assert mv.run_id == run.info.run_id == result["mlflow_run_id"]
    assert mv.tags["data_manifest_sha256"] == run.data.tags["data_manifest_sha256"]
    assert float(mv.tags["val_loss"]) == pytest.approx(result["val_loss"], rel=1e-5)
    assert float(mv.tags["val_bpb"]) == pytest.approx(result["val_bpb"], rel=1e-5)
    assert mv.tags["git_commit"]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "2"  # the trainer's params, logged into the flow's run
    assert run.data.params["flow.nproc"] == "1"
    # One name per measure: the trainer's evaluations as val_loss / val_bpb / val_perplexity, nothing else.
    assert {"val_loss", "val_bpb", "val_perplexity"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if "ppl" in k or k.startswith(("final", "registered"))]
    # The last evaluation is the registered (best = last) checkpoint's, over every val window.
    assert run.data.metrics["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-5)
    assert run.data.tags["registered_version"] == result["version"]
    assert run.data.tags["gate.decision"] == "promoted"
    artifacts = {a.path for a in mc.list_artifacts(run.info.run_id)}
    assert {"data", "samples.json", "retrieval"} <= artifacts
    # The index of its training data travels with the version, named by its sha256, with the filtered figure.
    manifest = json.loads(Path(result["data_dir"], "manifest.json").read_text())
    assert mv.tags[registry.INDEX_TAG] == manifest["index"]["sha256"]
    assert float(mv.tags["rag.filtered_val_bpb"]) == pytest.approx(result["retrieval"]["filtered"]["val_bpb"], rel=1e-5)
    # MLflow 3: the shards are the run's input, and the version is the trainer's LoggedModel of the best checkpoint.
    [dataset] = [d.dataset for d in run.inputs.dataset_inputs]
    assert mv.tags["data_manifest_sha256"].startswith(dataset.digest)
    logged = mc.get_logged_model(registry.source_model_id(mv))
    assert logged.source_run_id == run.info.run_id and logged.name == "best"
    assert {m.key for m in logged.metrics} >= {"val_loss", "val_bpb", "val_perplexity"}


@pytest.mark.slow
def test_runs_finishing_together_gate_one_after_the_other_and_an_identical_copy_is_not_promoted(stack, two_runs):
    """Both registered at the same moment: the first found no production version; the second was gated against
    the first (not against nothing, as without the lock), and an identical copy is no improvement."""
    (_, first), (_, second) = two_runs
    v1, v2 = first.result(), second.result()
    assert (v1["version"], v2["version"]) == ("1", "2")
    mc = registry.client(stack)
    gates = {v: json.loads(mc.get_model_version(NAME, v).tags["gate.json"]) for v in ("1", "2")}
    assert gates["1"]["champion_version"] is None and gates["1"]["promote"] and v1["promoted"]
    assert gates["2"]["champion_version"] == "1"
    assert v2["val_bpb"] == v1["val_bpb"] and gates["2"]["difference"] == 0.0  # the same weights, bit for bit
    assert not v2["promoted"] and not gates["2"]["promote"] and not v2["decision"]["promote"]
    tags = mc.get_model_version(NAME, "2").tags
    assert tags["gate.decision"] == "rejected"
    assert float(tags["gate.difference_bpb"]) == pytest.approx(gates["2"]["difference"], abs=1e-6)
    assert float(tags["gate.standard_error_bpb"]) == pytest.approx(gates["2"]["standard_error"], abs=1e-6)
    aliases = {k: str(v) for k, v in mc.get_registered_model(NAME).aliases.items()}
    assert aliases["production"] == aliases["champion"] == "1" and aliases["challenger"] == "2"


@pytest.mark.slow
def test_no_flow_log_line_shows_the_tracking_password(two_runs):
    """The runs were given an MLflow URI with the password in it: the logged torchrun command and every streamed
    trainer line reach Prefect without it."""
    for flow_run_id, _ in two_runs:
        logs = flow_run_logs(flow_run_id)
        assert any(line.startswith("$ ") and "gptmini.train" in line for line in logs)  # the logged command
        assert any(re.match(r"step +2/2 \| loss", line) for line in logs)  # the trainer's streamed lines
        assert not [line for line in logs if MLFLOW_PASSWORD in line]


@pytest.mark.slow
def test_a_bpe_version_carries_its_tokenizer_to_a_machine_that_never_saw_the_data(stack, two_runs, tmp_path,
                                                                                 monkeypatch, capsys):
    """`--param tokenizer=bpe:N`: the version names the trained tokenizer and its sha256, and a machine that
    never saw the data (a fresh cache) generates from the registry with it."""
    from gptmini.cli import main as gptmini

    (_, state), _ = two_runs
    result = state.result()
    manifest = json.loads((Path(result["data_dir"]) / "manifest.json").read_text())
    assert manifest["tokenizer"].startswith("bpe-300-") and manifest["n_vocab"] == 300
    mv = registry.client(stack).get_model_version(NAME, result["version"])
    assert mv.tags["tokenizer"] == manifest["tokenizer"]
    assert mv.tags["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "fresh-cache"))
    capsys.readouterr()
    assert gptmini(["generate", "--model", f"models:/{NAME}/{result['version']}", "--prompt", "def",
                    "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")
    assert list((tmp_path / "fresh-cache").rglob("tokenizer.tiktoken"))  # it came with the version


@pytest.mark.slow
def test_shards_folder_and_task_cache_are_keyed_by_prepares_input_key(two_runs):
    (_, first), (_, second) = two_runs
    data_dir = Path(first.result()["data_dir"])
    key = json.loads((data_dir / "manifest.json").read_text())["input_key"]
    assert data_dir.name == f"shards-{key[:16]}"
    assert second.result()["data_dir"] == str(data_dir)


@flow
def data_only(sources: list[str], data_root: str) -> dict:
    return tasks.prepare_shards(tasks.fetch(sources, f"{data_root}/cache"), "cl100k_base", 0.05, data_root)


@pytest.mark.slow
def test_tokenize_is_cached_while_the_sources_content_and_the_shards_stay(stack, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)

    def run() -> tuple[str, Path]:
        state = data_only([str(corpus)], str(tmp_path / "data"), return_state=True)
        assert state.is_completed(), state.message
        return task_states(state.state_details.flow_run_id)["tokenize"], Path(state.result()["data_dir"])

    first, first_dir = run()
    again, again_dir = run()
    assert (first, again) == ("Completed", "Cached") and again_dir == first_dir
    corpus.write_text("A different corpus under the same name. " * 200)
    changed, changed_dir = run()
    assert changed == "Completed" and changed_dir != first_dir
    shutil.rmtree(changed_dir)  # a cached result whose shards are gone is not reused
    remade, remade_dir = run()
    assert remade == "Completed" and remade_dir == changed_dir and (remade_dir / "manifest.json").is_file()


def test_a_training_flag_the_trainer_refuses_fails_the_flow_before_any_task(stack):
    """The flow reads extra_args with the trainer's own parser up front, so a bad flag fails the flow run at
    once, with the trainer's message, and no task (nor a retry of training) runs. A configuration error found
    only when training starts is not retried either: the stand-in tests below."""
    from flows.train_gpt import train_gpt

    state = train_gpt(**TINY, extra_args=["--no-such-flag"], train_retries=1, model_name=NAME, return_state=True)
    assert state.is_failed()
    assert "unrecognized arguments: --no-such-flag" in str(state.result(raise_on_failure=False))
    assert task_runs(state.state_details.flow_run_id) == {}


@pytest.mark.slow
def test_report_artifact_has_metrics_samples_and_registry_links(two_runs):
    (flow_run_id, _), _ = two_runs
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    report = next(a for a in artifacts if a.key == "train-gpt-report")
    assert "val_bpb" in report.data and "val_loss" in report.data and f"{NAME} v1" in report.data
    assert "greedy" in report.data and "top-k 40" in report.data and "greedy + retrieval" in report.data
    assert "own document excluded" in report.data
    assert "promoted to production" in report.data



def test_bad_flow_parameters_fail_before_any_task(stack):
    from flows.train_gpt import train_gpt

    state = train_gpt(preset="huge", return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        state.result()
    state = train_gpt(preset="tiny", sources=["ftp://example.org/x"], return_state=True)
    with pytest.raises(ValueError, match="not wikipedia:TITLE"):
        state.result()


def test_report_keeps_sample_text_inside_its_table_cell():
    from flows.report import report

    md = report({"val_loss": 1.5, "val_bpb": 2.0}, {"steps": 2, "best_step": 2},
                [{"mode": "greedy", "prompt": "a|b", "text": "x\ny|z"}],
                {"promote": False, "reason": "r", "difference": 0.01, "standard_error": 0.02, "pieces": 25},
                {"run": "r1", "version": "v1"}, "/runs/x", "ab", "3", "gptmini")
    assert "| registered (best checkpoint) | 2 | 2.0000 | 1.5000 |" in md and "not promoted" in md
    assert "+0.0100 bits/byte, standard error 0.0200, over 25 val pieces" in md
    row = next(line for line in md.splitlines() if line.startswith("| greedy"))
    assert row.count("|") - row.count("\\|") == 4  # three cells, whatever the text holds


def test_promote_model_flow_moves_production_and_rejects_an_unknown_version(stack, tiny_weights):
    from flows.promote import promote_model

    mc = registry.client(stack)
    experiment = mc.get_experiment_by_name("promote-test")
    run = mc.create_run(experiment.experiment_id if experiment else mc.create_experiment("promote-test"))
    mv = registry.log_model_version(mc, run.info.run_id, tiny_weights, {"val_loss": "9.0"}, name="promote-test")
    result = promote_model(version=int(mv.version), model_name="promote-test")
    assert result["promote"]
    aliases = {k: str(v) for k, v in mc.get_registered_model("promote-test").aliases.items()}
    assert aliases["production"] == aliases["champion"] == str(mv.version)

    state = promote_model(version=int(mv.version) + 5, model_name="promote-test", return_state=True)
    assert state.is_failed()
    with pytest.raises(registry.RegistryError, match="has no version"):
        state.result()


# How the train task reads a training's ending: the real task and Prefect's retries; a stand-in for
# torchrun writes the summary.json the trainer would and exits with its code.


@flow
def train_only(run_dir: str) -> dict:
    return tasks.train.with_options(retries=2, retry_delay_seconds=0)(
        "tiny", "data", run_dir, 2, 1, "none", "cpu", [], "mlflow-run-id", "sqlite:///unused.db", "run-name")


def summary_of(status: str, **fields) -> dict:
    return {"status": status, **fields}


COMPLETED = summary_of(ending.COMPLETED, steps=2)
ENDINGS = {
    "bad config": [(summary_of(ending.BAD_CONFIG, error="ConfigError: --train.steps must be >= 1", exit_code=2), 2)],
    "bad data": [(summary_of(ending.BAD_DATA, error="DataError: train-00000.arrow is damaged", exit_code=2), 2)],
    "preempted": [(summary_of(ending.PREEMPTED, steps=1), 0), (COMPLETED, 0)],
    "killed": [(None, -9), (COMPLETED, 0)],
    "out of memory": [(summary_of(ending.OOM, error="OutOfMemoryError: CUDA out of memory", exit_code=1), 1),
                      (COMPLETED, 0)],
    "failed": [(summary_of(ending.FAILED, error="RuntimeError: NCCL timeout", exit_code=1), 1), (COMPLETED, 0)],
}


@pytest.fixture
def stand_in(monkeypatch):
    """Replaces torchrun: each launch ends as the next of `endings` says; returns the commands it got."""
    launches: list[list[str]] = []
    endings: list = []

    real = tasks.run_streaming

    def run_streaming(cmd, env, keep=60):
        if "gptmini.train" not in cmd:  # the data tasks' `gptmini prepare` runs for real
            return real(cmd, env)
        run_dir = Path(cmd[cmd.index("--out") + 1])
        assert run_dir.is_dir(), "the trainer records its ending only in a run folder that exists"
        assert not (run_dir / "summary.json").exists(), "an earlier attempt's ending was left for this one"
        summary, code = endings[len(launches)]
        launches.append(cmd)
        if summary is not None:
            (run_dir / "summary.json").write_text(json.dumps(summary))
        return code, ["the trainer's last line"]

    monkeypatch.setattr(tasks, "run_streaming", run_streaming)
    return endings, launches


@pytest.mark.parametrize("kind", ["bad config", "bad data"])
def test_a_bad_configuration_or_bad_data_is_not_retried(stack, stand_in, tmp_path, kind):
    endings, launches = stand_in
    endings += ENDINGS[kind] * 3
    state = train_only(str(tmp_path / "run"), return_state=True)
    assert state.is_failed()
    assert len(launches) == 1
    message = str(state.result(raise_on_failure=False))
    assert ENDINGS[kind][0][0]["error"] in message
    assert ("rejected its configuration" if kind == "bad config" else "training data is unusable") in message


def test_a_training_that_fails_fails_the_flow_and_ends_its_mlflow_run_failed(stack, stand_in):
    """The whole flow, with the trainer's ending written by the stand-in: bad data is not retried, the flow
    run fails, and its on_failure hook ends the MLflow run the flow opened FAILED (not left RUNNING)."""
    from flows.train_gpt import train_gpt

    endings, launches = stand_in
    endings += ENDINGS["bad data"]
    state = train_gpt(**TINY, model_name=NAME, return_state=True)
    assert state.is_failed() and len(launches) == 1
    assert "training data is unusable" in str(state.result(raise_on_failure=False))
    run = mlflow_run_for(registry.client(stack), state.state_details.flow_run_id)
    assert run.info.status == "FAILED"
    assert "train" in task_states(state.state_details.flow_run_id)


@pytest.mark.parametrize("kind", ["preempted", "killed", "out of memory", "failed"])
def test_a_retryable_ending_is_retried_and_resumes_from_the_runs_checkpoint(stack, stand_in, tmp_path, kind):
    endings, launches = stand_in
    endings += ENDINGS[kind]
    state = train_only(str(tmp_path / "run"), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == COMPLETED
    assert len(launches) == 2 and launches[0] == launches[1]
    assert all(cmd[cmd.index("--resume") + 1] == "auto" for cmd in launches)


def test_retries_end_when_they_are_spent(stack, stand_in, tmp_path):
    endings, launches = stand_in
    endings += ENDINGS["preempted"][:1] * 3
    state = train_only(str(tmp_path / "run"), return_state=True)
    assert state.is_failed() and len(launches) == 3
    assert "training stopped early (preempted at step 1)" in str(state.result(raise_on_failure=False))
