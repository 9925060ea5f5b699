"""The train-gpt flow's tasks, and the subprocesses they stream into the Prefect log.

- The data tasks are cached: `download` by its inputs, `tokenize` by prepare's own `input_key` (the sources'
  content and the settings), which also names the shards folder; a `tokenize` result is reused only while
  its shards exist.
- `train` runs torchrun (`gptmini.launch`) in `state/runs/<flow run id>` with `--resume auto`, and reads how
  training ended with `gptmini.ending.outcome`: a retry resumes from the last checkpoint, and is tried only
  when it can help.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

from prefect import get_client, get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from gptmini import ending, rag, registry, tracking
from gptmini.ending import TrainingFailed
from gptmini.parallel import mesh_args
from gptmini.data.prepare import PrepareConfig, input_key, read_manifest
from gptmini.data.sources import SUFFIXES, Cache, open_source
from gptmini.evaluate import bpb_new_and_old, measures, new_pieces, piece_sums
from gptmini import files
from gptmini.files import sha256_file
from gptmini.gate import champion_challenger
from gptmini.generate import generate_text
from gptmini.launch import COMPLETED as COMPLETED_JOB, k8s, local, slurm
from gptmini.tokenizer import get_tokenizer
from gptmini.launch.k8s import K8sOptions
from gptmini.launch.slurm import SlurmOptions
from gptmini.redact import redact
from gptmini.retrieval import Index, read_val
from gptmini.weights import load_config, load_model, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
# Source specs that name no local path; anything else is a file, folder or glob.
SCHEMES = ("wikipedia:", "http://", "https://", "embedded:")
# (mode, temperature, top_k): the three ways the report samples each prompt.
SAMPLING = [("greedy", 0.0, 0), ("temperature 0.8", 0.8, 0), ("top-k 40", 1.0, 40)]


def state_dir() -> Path:
    """All flow outputs: data, runs and (without a server) MLflow, under $GPTMINI_STATE (default ./state)."""
    return Path(os.environ.get("GPTMINI_STATE") or ROOT / "state").resolve()


def result_storage() -> Path:
    """Where the cached tasks persist their results: in the state folder, beside the shards they point at. Every
    worker that shares $GPTMINI_STATE (one storage folder mounted on several machines) then shares the cache;
    Prefect's default (~/.prefect/storage, one per machine) would silently re-tokenize on every other worker."""
    return state_dir() / "prefect-results"


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI (infra sets the server's), else a SQLite store in the state folder."""
    return registry.resolve_tracking_uri(default=f"sqlite:///{state_dir() / 'mlflow' / 'mlflow.db'}")


def retry_io(task, task_run, state) -> bool:
    """Retry what the network or a server did, not a name, version or value the user got wrong."""
    return not isinstance(state.result(raise_on_failure=False), ValueError)  # RegistryError is one


def git_commit() -> str:
    """HEAD (`-dirty` when tracked files differ): what the registered version was trained by."""
    return files.git_commit(ROOT) or "unknown"


# Streaming subprocesses into the Prefect log


def run_streaming(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run `cmd`, sending each output line to the run log as it comes; returns (exit code, last lines). A
    cancelled flow run stops it (SIGTERM: training checkpoints first)."""
    get_run_logger().info("$ %s", redact(" ".join(cmd)))  # a tracking URI or source URL may hold a password
    on_line, tail = streaming_logger()
    return local.run(cmd, env, on_line, cwd=ROOT), list(tail)


def streaming_logger() -> tuple[Callable[[str], None], deque[str]]:
    """A sink for a subprocess's or a job's output lines: each goes to the run log (credentials masked), and
    the last 60 are kept to quote if it fails."""
    logger, tail = get_run_logger(), deque(maxlen=60)

    def on_line(line: str) -> None:
        tail.append(line)
        logger.info(redact(line))

    return on_line, tail


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("MLFLOW_RUN_ID", None)  # the run id goes explicitly on the command line
    return env


# Data


@task(retries=2, retry_delay_seconds=[5, 30], cache_policy=INPUTS + TASK_SOURCE,
      cache_expiration=timedelta(days=1), persist_result=True)
def download(sources: list[str], cache_dir: str) -> list[dict]:
    """Fetch every source into the on-disk cache. Returns `[{"spec", "inputs": [provenance, ...]}]`, one
    entry per source, each input with its sha256: the shape prepare keys its shards by."""
    logger = get_run_logger()
    found = []
    for spec in sources:
        records = open_source(spec, cache=Cache(Path(cache_dir))).provenance
        logger.info("%s: %d input(s), %s", redact(spec), len(records), ", ".join(r["sha256"][:12] for r in records))
        found.append({"spec": spec, "inputs": records})
    return found


def fetch(sources: list[str], cache_dir: str) -> list[dict]:
    """`download`, run afresh when a source is local: a file can change under the same path, and hashing it
    again is cheap (a download is cached on disk by URL anyway)."""
    local = any(not spec.startswith(SCHEMES) for spec in sources)
    return download.with_options(refresh_cache=local, result_storage=result_storage())(sources, cache_dir)


def shards_key(inputs: list[dict], tokenizer: str, val_fraction: float, since: str = "") -> str:
    """prepare's `input_key` for `inputs` (download's result) with the settings the `tokenize` task passes
    and prepare's defaults for the rest: the shards' cache key and folder name. input_key ignores `out`.
    `since`: the earlier dataset's manifest.json, against which the new inputs are marked."""
    cfg = PrepareConfig(sources=[s["spec"] for s in inputs], out=Path("."), tokenizer=tokenizer,
                        val_fraction=val_fraction)
    return input_key(cfg, inputs, read_manifest(since)["input_key"] if since else None)


def shards_dir(data_root: str, key: str) -> Path:
    return Path(data_root) / f"shards-{key[:16]}"


def _tokenize_cache_key(context, parameters: dict) -> str:
    return shards_key(parameters["inputs"], parameters["tokenizer"], parameters["val_fraction"],
                      parameters.get("since", ""))


@task(retries=1, cache_key_fn=_tokenize_cache_key, persist_result=True)
def tokenize(inputs: list[dict], tokenizer: str, val_fraction: float, data_root: str, since: str = "") -> dict:
    """`gptmini prepare` into the folder named by the inputs' key; returns it with its manifest's sha256. Inputs
    tokenized before (by any earlier run sharing the cache) are copied from the token cache, not tokenized."""
    key = shards_key(inputs, tokenizer, val_fraction, since)
    out = shards_dir(data_root, key)
    cmd = [sys.executable, "-m", "gptmini.cli", "prepare", *(s["spec"] for s in inputs), "--out", str(out),
           "--tokenizer", tokenizer, "--val-fraction", str(val_fraction), "--index"] + (["--since", since] if since else [])
    code, tail = run_streaming(cmd, subprocess_env(GPTMINI_CACHE_DIR=str(Path(data_root) / "cache")))
    if code != 0:
        raise RuntimeError(f"gptmini prepare failed (exit code {code}): {tail[-1] if tail else 'no output'}")
    if read_manifest(out)["input_key"] != key:  # the result would be cached under the wrong content
        raise RuntimeError("a source changed between the download and tokenize tasks; run the flow again")
    return {"data_dir": str(out), "manifest_sha256": sha256_file(out / "manifest.json")}


def prepare_shards(inputs: list[dict], tokenizer: str, val_fraction: float, data_root: str, since: str = "") -> dict:
    """`tokenize`, whose cached result counts only while its shards are on disk: deleted, they are made again
    and cached anew."""
    present = (shards_dir(data_root, shards_key(inputs, tokenizer, val_fraction, since)) / "manifest.json").exists()
    return tokenize.with_options(refresh_cache=not present, result_storage=result_storage())(
        inputs, tokenizer, val_fraction, data_root, since)


def incoming_sources(folder: str) -> list[str]:
    """The incoming folder as a source when it holds files to read; a missing or empty one adds nothing (a
    night with no new text is no error)."""
    path = Path(folder).expanduser() if folder else None
    if path is None or not path.is_dir():
        return []
    found = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SUFFIXES]
    return [str(path.resolve())] if found else []


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_io)
def parent_manifest(version: str, model_name: str, data_root: str) -> str:
    """The data manifest a registered version was trained on (its run's `data/manifest.json` artifact), as a
    local file: what the new dataset marks its new documents against; its index, if it has one, beside it."""
    mc = registry.client(tracking_uri())
    mv = registry.get_version(mc, version, model_name)
    dest = Path(data_root) / "parents" / f"{model_name}-v{version}"
    dest.mkdir(parents=True, exist_ok=True)
    manifest = Path(mc.download_artifacts(mv.run_id, "data/manifest.json", str(dest)))
    # The version's retrieval index beside its manifest: `gptmini prepare --since` then updates it with the new
    # inputs instead of reading the whole grown corpus again.
    index = registry.resolve_index(f"models:/{model_name}/{version}", tracking_uri())
    if index is not None and not (dest / index.name).exists():
        try:
            os.link(index, dest / index.name)  # the registry cache's file is never written again
        except OSError:  # another filesystem
            with files.atomic_path(dest / index.name) as tmp:
                shutil.copyfile(index, tmp)
    return str(manifest)


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_io)
def parent_tokenizer(version: str, model_name: str) -> str:
    """The tokenizer a registered version reads, made available on this machine: a trained BPE's file comes
    with the version's weights and is copied into the tokenizer cache, where preparing data finds it."""
    folder = registry.resolve_model_uri(f"models:/{model_name}/{version}", tracking_uri())
    name = load_config(folder).tokenizer
    get_tokenizer(name, search=folder)
    return name


# Training


def _retry_training(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, TrainingFailed) or exc.retryable


@task(retry_condition_fn=_retry_training, retry_delay_seconds=10)
def train(preset: str, data_dir: str, run_dir: str, steps: int | None, nproc: int, parallel: str, device: str,
          extra_args: list[str], mlflow_run_id: str, mlflow_uri: str, run_name: str, nnodes: int = 1,
          rdzv_endpoint: str = "", launcher: str = "local", slurm_options: SlurmOptions | None = None,
          k8s_options: K8sOptions | None = None) -> dict:
    """torchrun -m gptmini.train, here, as a Slurm job or as a Kubeflow TrainJob; its output streams into this
    task's log. Resumes from run_dir's last checkpoint (`--resume auto`), so a retry continues where the failed
    attempt stopped."""
    # A password in the URI would land in the logged node command and the sbatch script: it travels in the
    # environment (MLFLOW_TRACKING_USERNAME/PASSWORD), which subprocesses and Slurm jobs inherit.
    plain_uri = tracking.credentials_to_env(mlflow_uri)
    with_credentials, mlflow_uri = plain_uri != mlflow_uri, plain_uri
    trainer = ["--preset", preset, "--data-dir", data_dir, "--out", run_dir, *mesh_args(parallel),
               "--device", device, "--resume", "auto", "--tracking-uri", mlflow_uri, "--mlflow-run-id", mlflow_run_id,
               "--run-name", run_name]
    trainer += (["--steps", str(steps)] if steps is not None else []) + list(extra_args)
    # The trainer records how it ended in a run folder that exists; a previous attempt's ending is not this one's.
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    ending.clear(run_dir)
    if launcher == "slurm":
        return train_on_slurm(trainer, Path(run_dir), nnodes, nproc, slurm_options or SlurmOptions(), run_name)
    if launcher == "k8s":
        return train_on_k8s(trainer, Path(run_dir), nnodes, nproc, k8s_options or K8sOptions())
    launch = local.torchrun_args(nproc, nnodes, rdzv_endpoint, mlflow_run_id)
    if nnodes > 1:  # data_dir and run_dir must be on storage that every node sees at the same path
        get_run_logger().info("waiting for %d more node(s); start this on each of them:\n  %s%s",
                              nnodes - 1, local.node_command(launch, trainer),
                              "\n  (with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD set in its environment)"
                              if with_credentials else "")
    code, tail = run_streaming(local.command(launch, trainer), subprocess_env())
    return ending.outcome(ending.read(run_dir), code == 0, f"torchrun exited with code {code}", tail)


def train_on_slurm(trainer: list[str], run_dir: Path, nnodes: int, nproc: int, options: SlurmOptions,
                   job_name: str) -> dict:
    """One sbatch job over `nnodes` nodes, followed to its end (a cancelled flow run scancels it). The job's
    end state decides the retry as a local exit code would; the trainer's summary says whether it can help."""
    logger = get_run_logger()
    on_line, tail = streaming_logger()
    try:
        state = slurm.launch(trainer, run_dir, nodes=nnodes, nproc_per_node=nproc, options=options, on_line=on_line,
                             env=subprocess_env(), job_name=job_name,
                             on_submit=lambda job: logger.info("submitted Slurm job %s (%s)", job, run_dir / "slurm-job.sh"))
    except slurm.SlurmError as exc:
        raise TrainingFailed(str(exc), retryable=False) from None
    logger.info("Slurm job ended %s", state)
    return ending.outcome(ending.read(run_dir), state == COMPLETED_JOB, f"the Slurm job ended {state}", tail)


def train_on_k8s(trainer: list[str], run_dir: Path, nnodes: int, nproc: int, options: K8sOptions) -> dict:
    """One Kubeflow Trainer TrainJob, named after the run folder, followed to its end (a cancelled flow run deletes
    it). Not run on a cluster in our tests: the manifest is validated against Trainer's API models."""
    on_line, tail = streaming_logger()
    name = "gptmini-" + run_dir.name[:8]  # the flow run id's first 8 hex digits
    try:
        state = k8s.launch(trainer, name, nnodes=nnodes, nproc_per_node=nproc, options=options, on_line=on_line)
    except k8s.K8sError as exc:
        raise TrainingFailed(str(exc), retryable=False) from None
    get_run_logger().info("TrainJob %s ended %s", name, state)
    return ending.outcome(ending.read(run_dir), state == COMPLETED_JOB, f"the TrainJob ended {state}", tail)


# Evaluation, samples and the registry

# Registration, the gate and every alias move happen under this Prefect global concurrency limit (1 slot): two
# runs finishing together (a manual demo and the 03:00 retrain) would otherwise both find the same production
# version, or none, and both promote, leaving the alias on whichever wrote last.
REGISTRY_LOCK = "gptmini-registry"


@contextmanager
def registry_lock(timeout_s: float = 3600) -> Iterator[None]:
    """Hold the registry lock, creating its limit on first use; it holds across processes and machines,
    since the Prefect server keeps it. A run that cannot get it within `timeout_s` fails (TimeoutError)."""
    with get_client(sync_client=True) as api:
        try:
            api.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=REGISTRY_LOCK, limit=1))
        except ObjectAlreadyExists:
            pass
    with concurrency(REGISTRY_LOCK, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield


@task
def export_best(run_dir: str) -> str:
    """The best checkpoint's weights alone (safetensors + config.json), the folder that gets registered."""
    model, _ = load_model(Path(run_dir) / "checkpoints" / "best")
    return str(save_pretrained(model, Path(run_dir) / "registry-weights"))


@task
def evaluate(weights_dir: str, data_dir: str) -> dict:
    """val_loss, val_bpb, val_perplexity, val_tokens and val_bytes of a model folder over every window of the
    held-out split of `data_dir`; with a dataset that marks new documents, also val_bpb_new and val_bpb_old."""
    model, tokenizer = load_model(weights_dir)
    nats, nbytes, tokens = piece_sums(model, tokenizer, data_dir)
    result = measures(nats.sum(), nbytes.sum(), tokens.sum())
    if (new := new_pieces(data_dir)) is not None:
        result |= bpb_new_and_old(nats, nbytes, new)
    get_run_logger().info("%s: val loss %.4f nats/token, %.4f bits/byte over %s tokens (%s bytes)%s", weights_dir,
                          result["val_loss"], result["val_bpb"], f"{result['val_tokens']:,}", f"{result['val_bytes']:,}",
                          "".join(f"; {k} {v:.4f}" for k, v in result.items() if k.startswith("val_bpb_") and v is not None))
    return result


@task
def evaluate_rag(weights_dir: str, data_dir: str) -> dict | None:
    """The leakage-filtered retrieval figure (`gptmini eval --rag`'s second) and recall@k on the val pieces; None
    without an index. The flow measures only that one, every 64 targets, to keep its cost to a few seconds."""
    if not read_manifest(data_dir).get("index"):
        return None
    model, tokenizer = load_model(weights_dir)
    result = rag.evaluate(model, tokenizer, Index.of(data_dir), read_val(data_dir), stride=64,
                          modes=("none", "filtered"))
    for line in rag.summary_lines(result):
        get_run_logger().info("retrieval: %s", line)
    return result


@task
def samples(weights_dir: str, prompts: list[str], max_new_tokens: int, data_dir: str | None = None) -> list[dict]:
    """Greedy, temperature and top-k continuations of each prompt, for the report; and, with an index, the
    greedy one after the best passage (`rag.generate_text`, as `gptmini generate --rag`), with its citation."""
    model, tokenizer = load_model(weights_dir)
    index = Index.of(data_dir) if data_dir and read_manifest(data_dir).get("index") else None
    rows = []
    for prompt in prompts:
        for mode, temperature, top_k in SAMPLING:
            text = generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, seed=0)
            rows.append({"mode": mode, "prompt": prompt, "text": text})
            get_run_logger().info("[%s] %r -> %r", mode, prompt, text)
        if index is not None:
            text, cited = rag.generate_text(model, tokenizer, index, prompt, max_new_tokens, temperature=0)
            rows.append({"mode": "greedy + retrieval", "prompt": prompt, "text": text,
                         "citations": [f"{p.document} @{p.offset}" for p in cited]})
            get_run_logger().info("[greedy + retrieval] %r -> %r (from %s)", prompt, text, rows[-1]["citations"])
    return rows


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_io)
def register(run_id: str, weights_dir: str, tags: dict[str, str], model_name: str, model_id: str | None = None) -> str:
    """A new version from the trainer's LoggedModel of the best checkpoint (`model_id`), or, when the trainer
    logged none, from `weights_dir`."""
    mc = registry.client(tracking_uri())
    if model_id:
        version = registry.register_logged_model(mc, model_id, tags, name=model_name)
    else:
        version = registry.log_model_version(mc, run_id, weights_dir, tags, name=model_name)
    get_run_logger().info("registered %s version %s (alias challenger)%s", model_name, version.version,
                          f" from logged model {model_id}" if model_id else "")
    return str(version.version)


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_io)
def gate(version: str, weights_dir: str, val_bpb: float, data_dir: str, promotion: str, min_improvement: float,
         model_name: str) -> dict:
    """Champion/challenger: promote the new version only if it beats production beyond noise, paired on the same
    val text."""
    decision = champion_challenger(registry.client(tracking_uri()), version, weights_dir, val_bpb, data_dir, promotion,
                                   min_improvement, model_name)
    get_run_logger().info("gate: %s (%s)", "promoted" if decision.promote else "not promoted", decision.reason)
    return asdict(decision)
