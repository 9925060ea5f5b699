"""MLflow runs: the trainer's tracker (rank 0) and the run a Prefect flow run owns. MLflow is imported
lazily, so the library runs without it.

The trainer's tracker:
- No tracking URI (neither --tracking-uri nor $MLFLOW_TRACKING_URI), not rank 0, or MLflow absent:
  a no-op `Tracker`; training never needs MLflow.
- A run id from the caller (--mlflow-run-id or $MLFLOW_RUN_ID, e.g. the Prefect flow): we log into that
  run through MlflowClient and never end it. We never call the fluent `mlflow.start_run()`: with
  $MLFLOW_RUN_ID set it adopts the caller's run and its exit handler would mark it FINISHED.
- Otherwise we create the run, note its id in RUN/mlflow_run.json (a resumed run continues it), and
  end it ourselves.

Every call only enqueues; a background thread sends batches and keeps what failed to retry later, so a
briefly unreachable server never stalls or kills training. Whatever is still unsent at close is written
to RUN/mlflow_unsent.jsonl and counted in the log. The one exception is `log_model`, at the end of training:
it waits for the queue to drain, then makes an MLflow 3 LoggedModel of a checkpoint folder (its artifacts
upload in the call) with the metrics that chose it, linked to the model and to the run's dataset.

The dataset is the prepared shard folder (`log_dataset`): a run input whose digest is manifest.json's sha256
(its first 36 characters, all MLflow keeps), so a retried flow or a resumed training logs the same input
again, which MLflow keeps once.

The flow's run (`open_flow_run`): created once per flow run, tagged with its id, reopened when the flow run
is retried, and ended by the flow (FINISHED) or its state hooks (`end_flow_run`: FAILED or KILLED).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptmini.config import TrackingConfig
from gptmini.data.prepare import read_manifest
from gptmini.files import sha256_file, write_json
from gptmini.redact import redact
from gptmini.registry import client, log_logged_model, resolve_tracking_uri
from gptmini.trainer import Tracker

MAX_BATCH = 1000  # MLflow's log_batch limit for metrics
MAX_PARAMS = 100  # ... and for params
# Params that legitimately differ between a run and its resumption; MLflow forbids changing a param.
VOLATILE_PARAMS = ("train.resume",)
EXPERIMENT_NAME = TrackingConfig.experiment
FLOW_RUN_TAG = "prefect.flow_run_id"
# MLflow 3 opens an experiment without this tag in its GenAI layout (traces, prompts), which hides the runs'
# metrics and charts.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
DATASET_DIGEST_CHARS = 36  # the longest dataset digest MLflow stores


def credentials_to_env(uri: str) -> str:
    """`http://user:pass@host` -> `http://host`, with the credentials moved to MLFLOW_TRACKING_USERNAME/PASSWORD:
    MLflow prints the URI it was given ("View run at ..."), and would print the password with it."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def experiment_id(mlflow_client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created (tagged as model training) if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
    except MlflowException:
        exp = mlflow_client.get_experiment_by_name(name)  # created meanwhile by a concurrent run
        if exp is None:
            raise
        return exp.experiment_id


def shard_dataset(manifest_path: Path):
    """The prepared shard folder of `manifest_path` as an MLflow dataset. Its digest is manifest.json's sha256
    (the manifest names every shard by its own sha256), cut to the 36 characters MLflow stores; the whole one
    is in the profile, next to each split's token count, to match the versions' `data_manifest_sha256`. The
    name (sources and tokenizer) tells datasets apart for a reader."""
    from mlflow.entities import Dataset
    from mlflow.types import ColSpec, Schema

    manifest = read_manifest(manifest_path)
    sha256 = sha256_file(manifest_path)
    specs = [s["spec"] for s in manifest.get("sources", [])]
    shown = " + ".join(specs[:2]) + (f" + {len(specs) - 2} more" if len(specs) > 2 else "")
    schema = Schema([ColSpec("long", manifest.get("column", "tokens"))])  # uint32 token ids, one per row
    return Dataset(
        name=f"{shown or 'shards'} ({manifest['tokenizer']})"[:200],
        digest=sha256[:DATASET_DIGEST_CHARS],
        source_type="local",
        source=json.dumps({"uri": str(manifest_path.parent.resolve())}),
        schema=json.dumps({"mlflow_colspec": schema.to_dict()}),
        profile=json.dumps({**{f"{split}_tokens": info["tokens"] for split, info in manifest["splits"].items()},
                            "manifest_sha256": sha256}),
    )


def training_input(dataset):
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


def open_tracker(cfg: Any, run_dir: Path, is_main: bool) -> Tracker:
    """The trainer's tracker for this process (`cfg.tracking`): MLflow on rank 0 when a tracking URI is set
    and MLflow is installed, else the no-op one."""
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    if not is_main or not uri:
        return Tracker()
    try:
        import mlflow  # noqa: F401  (optional: the GPU machines have none)
    except ImportError:
        print(f"gptmini: MLflow tracking URI {redact(uri)!r} is set but mlflow is not installed; "
              f"tracking is off (pip install 'mlflow>=3.17' to enable it)", file=sys.stderr)
        return Tracker()
    return MlflowTracker(uri, cfg, Path(run_dir))


class MlflowTracker(Tracker):
    def __init__(self, uri: str, cfg: Any, run_dir: Path, flush_every_s: float = 2.0):
        from mlflow import MlflowClient

        # MLflow's client retries a failed request inside the call for about two minutes (7 tries, backoff),
        # which held our thread, and the exit, while the server was down. The thread buffers and retries on
        # its own, so one try per call (set these variables to choose otherwise).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.uri = uri
        self.shown_uri = redact(uri)  # what logs and files may show: no password from the URI
        self.client = MlflowClient(tracking_uri=credentials_to_env(uri))
        self.run_dir = run_dir
        self.flush_every_s = flush_every_s
        self.system_metrics = cfg.tracking.system_metrics
        if self.system_metrics and importlib.util.find_spec("psutil") is None:
            print("gptmini: system metrics need psutil, which is not installed; logging none "
                  "(pip install 'gptmini[pipeline]', or --tracking.system_metrics false to silence this)",
                  file=sys.stderr)
            self.system_metrics = False
        self.run_id, self.owns_run = self._open_run(cfg)
        self._queue: queue.Queue = queue.Queue()
        self._pending_metrics: list[Any] = []
        # ("params", list) / ("artifact", path, artifact_path) / ("inputs", list)
        self._pending_other: list[tuple] = []
        self.dataset: Any = None  # the run's dataset (log_dataset), which the model metrics name
        self._errors = 0
        self._system_step = -1
        self._last_error = ""
        self._thread = threading.Thread(target=self._worker, name="gptmini-mlflow", daemon=True)
        self._thread.start()

    def _open_run(self, cfg: Any) -> tuple[str, bool]:
        given = cfg.tracking.run_id or os.environ.get("MLFLOW_RUN_ID", "")
        if given:
            self.client.get_run(given)  # fails clearly on a wrong id, before any training
            return given, False
        marker = self.run_dir / "mlflow_run.json"
        if marker.is_file():  # our own run, interrupted: continue it rather than split the curves
            saved = json.loads(marker.read_text())
            if saved.get("tracking_uri") == self.shown_uri:
                self.client.update_run(saved["run_id"], status="RUNNING")
                return saved["run_id"], True
        exp_id = experiment_id(self.client, cfg.tracking.experiment)
        run = self.client.create_run(exp_id, run_name=cfg.tracking.run_name or None,
                                     tags={"gptmini.run_dir": str(self.run_dir.resolve())})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"run_id": run.info.run_id, "tracking_uri": self.shown_uri})
        return run.info.run_id, True

    # The training loop's side: enqueue and return.

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # Masked: a source URL or tracking URI may carry user:password@ or ?token= (gptmini/redact.py).
        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items() if k not in VOLATILE_PARAMS]
        self._queue.put(("params", items))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._queue.put(("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", str(path), artifact_path))

    def log_dataset(self, manifest_path: Path) -> None:
        self.dataset = shard_dataset(Path(manifest_path))
        self._queue.put(("inputs", [training_input(self.dataset)]))

    def log_model(self, name: str, folder: Path, step: int, metrics: dict[str, float]) -> str | None:
        """A LoggedModel `name` of checkpoint `folder` with `metrics` at `step`; its id, or None when MLflow
        failed (said in one line: the checkpoint is on disk, and training must not fail for its model entry)."""
        self._drain()
        try:
            model_id = log_logged_model(self.client, self.run_id, name, folder, step,
                                        {"gptmini.folder": str(Path(folder).resolve()), "gptmini.step": str(step)})
            self.client.log_batch(self.run_id, metrics=self._model_metrics(model_id, step, metrics),
                                  synchronous=True)
            return model_id
        except Exception as exc:
            detail = " ".join(str(exc).split())[:300]  # MLflow's messages run over several lines
            print(f"gptmini: could not log the {name} model ({folder}) to MLflow at {self.shown_uri}: "
                  f"{redact(f'{type(exc).__name__}: {detail}')}", file=sys.stderr)
            return None

    def _drain(self, timeout_s: float = 60.0) -> None:
        """Wait until what was queued so far was sent (or failed to be): log_model reads the run's metrics."""
        if self._thread.is_alive():
            done = threading.Event()
            self._queue.put(("drain", done))
            done.wait(timeout_s)

    def _model_metrics(self, model_id: str, step: int, metrics: dict[str, float]) -> list[Any]:
        """`metrics` at `step` for model `model_id`, on the run's dataset. A value the run already holds at that
        step keeps its timestamp, so the run's history gains no second point (MLflow skips an identical one)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ds = {"dataset_name": self.dataset.name, "dataset_digest": self.dataset.digest} if self.dataset else {}
        out = []
        for key, value in metrics.items():
            same = [m.timestamp for m in self.client.get_metric_history(self.run_id, key)
                    if m.step == step and m.value == float(value)]
            out.append(Metric(key, float(value), same[0] if same else now, step, model_id=model_id,
                              run_id=self.run_id, **ds))
        return out

    def close(self, status: str, timeout_s: float = 120.0) -> None:
        self._queue.put(("close",))
        self._thread.join(timeout_s)
        unsent = len(self._pending_metrics) + len(self._pending_other)
        if unsent:
            self._dump_unsent()
            print(f"gptmini: MLflow at {self.shown_uri} took {unsent} items fewer than sent "
                  f"({len(self._pending_metrics)} metrics); they are in {self.run_dir / 'mlflow_unsent.jsonl'} "
                  f"(last error: {self._last_error})", file=sys.stderr)
        if self.owns_run:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as exc:  # the server is gone: the run stays RUNNING there; say so
                print(f"gptmini: could not mark MLflow run {self.run_id} {status}: {redact(str(exc))}", file=sys.stderr)

    # The background thread's side: send, keep what failed, retry.

    def _worker(self) -> None:
        last_flush, last_sample = time.monotonic(), -math.inf
        closing = False
        while not closing:
            try:
                item = self._queue.get(timeout=0.5)
                closing = self._take(item)
                while not self._queue.empty() and not closing:
                    closing = self._take(self._queue.get_nowait())
            except queue.Empty:
                pass
            now = time.monotonic()
            if self.system_metrics and now - last_sample >= 10.0:
                self._sample_system()
                last_sample = now
            if closing and self.system_metrics:
                self._sample_system()
            if closing or now - last_flush >= self.flush_every_s:
                self._flush(final=closing)
                last_flush = time.monotonic()

    def _take(self, item: tuple) -> bool:
        if item[0] == "metrics":
            self._pending_metrics.extend(item[1])
        elif item[0] in ("params", "artifact", "inputs"):
            self._pending_other.append(item)
        elif item[0] == "drain":
            self._flush(final=False)
            item[1].set()
        return item[0] == "close"

    def _flush(self, final: bool) -> None:
        attempts = 3 if final else 1
        for attempt in range(attempts):
            try:
                self._send()
                return
            except Exception as exc:  # unreachable server, 5xx: keep everything and retry on the next flush
                self._errors += 1
                self._last_error = redact(f"{type(exc).__name__}: {str(exc)[:200]}")
                if self._errors == 1 or final:
                    print(f"gptmini: MLflow logging failed ({self._last_error}); buffering and retrying",
                          file=sys.stderr)
                if attempt + 1 < attempts:
                    time.sleep(2.0 * (attempt + 1))

    def _send(self) -> None:
        while self._pending_other:
            item = self._pending_other[0]
            if item[0] == "params":
                self._send_params(item[1])
            elif item[0] == "inputs":
                self.client.log_inputs(self.run_id, datasets=item[1])
            elif Path(item[1]).is_dir():  # a folder's files go under artifact_path, not artifact_path/NAME
                self.client.log_artifacts(self.run_id, item[1], item[2])
            else:
                self.client.log_artifact(self.run_id, item[1], item[2])
            self._pending_other.pop(0)
        while self._pending_metrics:
            batch = self._pending_metrics[:MAX_BATCH]
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            del self._pending_metrics[: len(batch)]

    def _send_params(self, params: list[Any]) -> None:
        from mlflow.exceptions import MlflowException

        for i in range(0, len(params), MAX_PARAMS):
            chunk = params[i : i + MAX_PARAMS]
            try:
                self.client.log_batch(self.run_id, params=chunk, synchronous=True)
            except MlflowException as exc:
                if "INVALID_PARAMETER_VALUE" not in str(exc.error_code):
                    raise
                # A param the caller (or an earlier attempt) set to another value: keep theirs.
                for p in chunk:
                    try:
                        self.client.log_batch(self.run_id, params=[p], synchronous=True)
                    except MlflowException:
                        print(f"gptmini: MLflow param {p.key} already set to another value; kept it",
                              file=sys.stderr)

    def _sample_system(self) -> None:
        from mlflow.entities import Metric

        import psutil

        now = int(time.time() * 1000)
        proc = psutil.Process()
        values = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(),
            "system/system_memory_usage_percentage": psutil.virtual_memory().percent,
            "system/process_rss_megabytes": proc.memory_info().rss / 2**20,
        }
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            values["system/gpu_memory_allocated_megabytes"] = torch.cuda.memory_allocated() / 2**20
            values["system/gpu_max_memory_allocated_megabytes"] = torch.cuda.max_memory_allocated() / 2**20
        self._system_step += 1
        self._pending_metrics.extend(Metric(k, float(v), now, self._system_step) for k, v in values.items())

    def _dump_unsent(self) -> None:
        path = self.run_dir / "mlflow_unsent.jsonl"
        with open(path, "a") as f:
            for m in self._pending_metrics:
                f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
            for item in self._pending_other:
                f.write(json.dumps({"unsent": item[0], "detail": str(item[1:])[:500]}) + "\n")


# The flow's run


@dataclass
class FlowRun:
    """The MLflow run of one Prefect flow run: the flow logs into it here, the trainer through its id."""

    client: Any
    experiment_id: str
    run_id: str

    def log_params(self, params: dict[str, Any]) -> None:
        # Logging a param again with the same value (a retried flow run) is allowed; masked as the
        # trainer's are, since a source URL may carry user:password@ or ?token=.
        for key, value in params.items():
            self.client.log_param(self.run_id, key, redact(str(value)))

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, manifest_path: Path) -> None:
        """The shard folder of `manifest_path` as the run's training input; again with the same manifest (a
        retried flow run) it stays one input."""
        self.client.log_inputs(self.run_id, datasets=[training_input(shard_dataset(Path(manifest_path)))])

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def open_flow_run(uri: str, experiment: str, flow_run_id: str, tags: dict[str, str],
                  artifact_root: Path | None = None) -> FlowRun:
    """The MLflow run of flow run `flow_run_id`: created on its first attempt, set RUNNING again on a retry,
    so every attempt logs into one run. A new experiment keeps its artifacts under `artifact_root` unless
    the store is a server, which places them itself."""
    mc = client(uri)
    local = artifact_root is not None and not uri.startswith(("http://", "https://"))
    exp_id = experiment_id(mc, experiment, artifact_root.as_uri() if local else None)
    run = _find_flow_run(mc, exp_id, flow_run_id)
    if run is None:
        run = mc.create_run(exp_id, tags={**tags, FLOW_RUN_TAG: flow_run_id}, run_name=tags.get("mlflow.runName"))
    else:
        mc.update_run(run.info.run_id, status="RUNNING")
    return FlowRun(mc, exp_id, run.info.run_id)


def end_flow_run(uri: str, experiment: str, flow_run_id: str, status: str, final_state: str) -> None:
    """End the MLflow run of flow run `flow_run_id` (if it has one) with `status`, noting the flow run's
    `final_state` on it: for the flow's state hooks, and for flow runs whose process died."""
    mc = client(uri)
    exp = mc.get_experiment_by_name(experiment)
    run = exp and _find_flow_run(mc, exp.experiment_id, flow_run_id)
    if run:
        mc.set_tag(run.info.run_id, "prefect.final_state", final_state[:5000])
        mc.set_terminated(run.info.run_id, status)


def _find_flow_run(mlflow_client, experiment_id: str, flow_run_id: str):
    runs = mlflow_client.search_runs([experiment_id], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
    return runs[0] if runs else None
