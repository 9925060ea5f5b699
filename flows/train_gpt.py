"""The `train-gpt` flow: raw text -> token shards -> torchrun training -> evaluation -> samples -> registry.

    download -> tokenize -> train (torchrun) -> evaluate -> samples -> register -> gate (champion/challenger)

- The data tasks are cached by the hash of their inputs (the shards also by the sources' content), so a
  re-run does not re-download or re-tokenize; a `tokenize` result is reused only while its shards exist.
- Each flow run trains in `state/runs/<flow run id>` with `--resume auto`: a retried flow run (or a retried
  train task) resumes from that run's last checkpoint instead of starting over.
- The flow owns the MLflow run: it creates it, the trainer logs into it (and never ends it), and the flow
  ends it FINISHED, or FAILED / KILLED from its state hooks.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections import deque
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run as current_flow_run

from gptmini import registry
from gptmini.redact import redact

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCES = ["embedded:python-docs"]
DEFAULT_PROMPTS = ["The Python interpreter", "A list comprehension", "def main():"]
# (mode, temperature, top_k): the three ways the report samples each prompt.
SAMPLING = [("greedy", 0.0, 0), ("temperature 0.8", 0.8, 0), ("top-k 40", 1.0, 40)]


def state_dir() -> Path:
    """All flow outputs: data, runs and (without a server) MLflow, under $GPTMINI_STATE (default ./state)."""
    return Path(os.environ.get("GPTMINI_STATE") or ROOT / "state").resolve()


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI (infra sets the server's), else a SQLite store in the state folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow' / 'mlflow.db'}"


class TrainingFailed(RuntimeError):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


# Streaming subprocesses into the Prefect log


# Loaded here, not in the forked child, where only the prctl call itself runs.
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the flow process dies (cancelled or killed), so no torchrun is
    orphaned; torchrun forwards it to the ranks, which checkpoint and exit."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_streaming(cmd: list[str], env: dict[str, str], keep: int = 60) -> tuple[int, list[str]]:
    """Run `cmd`, sending each output line to the run log as it comes; returns (exit code, last lines)."""
    logger = get_run_logger()
    logger.info("$ %s", redact(" ".join(cmd)))  # a tracking URI or source URL may hold a password
    tail: deque[str] = deque(maxlen=keep)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            text=True, errors="replace", bufsize=1, preexec_fn=_die_with_parent)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n").split("\r")[-1]  # a progress bar's last frame
            if line.strip():
                tail.append(line)
                logger.info(redact(line))
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:  # interrupted here (cancellation): stop training cleanly
            proc.terminate()
            proc.wait(timeout=60)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("MLFLOW_RUN_ID", None)  # the run id goes explicitly on the command line
    return env


def explain_training_failure(code: int, tail: list[str]) -> TrainingFailed:
    """One clear message for the ways a torchrun training ends badly."""
    text = "\n".join(tail)
    worker = re.findall(r"exitcode\s*:\s*(-?\d+)", text)
    exit_code = int(worker[0]) if worker else code
    errors = [ln.strip() for ln in tail if re.search(r"(Error|error:|Exception)\b", ln) and "Traceback" not in ln]
    cause = errors[-1] if errors else (tail[-1] if tail else "no output")
    last = "\n".join(tail[-15:])
    if "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return TrainingFailed("training ran out of GPU memory; lower the batch size (extra_args "
                              "['--batch-size', '4']) or use parallel='fsdp'. Last output:\n" + last, True)
    if exit_code in (-9, 137) or "Signals.SIGKILL" in text:
        return TrainingFailed("a training process was killed (SIGKILL: out of host memory, or killed by hand); "
                              "a retry resumes from the last checkpoint. Last output:\n" + last, True)
    if exit_code == 2 or "ConfigError" in text or "usage:" in text:
        return TrainingFailed(f"the trainer rejected its configuration: {cause}. Fix the flow parameters "
                              "(preset, steps, parallel, extra_args). Last output:\n" + last, False)
    if "DataError" in text or "ShardError" in text:
        return TrainingFailed(f"the training data is unusable: {cause}. Last output:\n" + last, False)
    if "rendezvous" in text.lower() or "Address already in use" in text:
        return TrainingFailed(f"torchrun could not start its process group: {cause}. Last output:\n" + last, True)
    return TrainingFailed(f"training failed (exit code {exit_code}): {cause}. Last output:\n" + last, True)


def _retry_training(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, TrainingFailed) or exc.retryable


def retry_io(task, task_run, state) -> bool:
    """Retry what the network or a server did, not a name, version or value the user got wrong."""
    return not isinstance(state.result(raise_on_failure=False), ValueError)  # RegistryError is one


# Data tasks


def check_sources(sources: list[str]) -> list[str]:
    """Validate the sources at the flow's boundary (before any retrying task); local paths become absolute."""
    if not sources:
        raise ValueError("sources is empty; give at least one, e.g. ['embedded:python-docs'] or ['wikipedia:Python']")
    out = []
    for spec in sources:
        if spec.startswith(("wikipedia:", "http://", "https://", "embedded:")):
            out.append(spec)
        elif Path(spec).expanduser().exists() or any(ch in spec for ch in "*?["):
            out.append(str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().exists() else spec)
        else:
            raise ValueError(f"source {spec!r} is not wikipedia:TITLE, http(s)://URL, embedded:NAME or an "
                             "existing local path; fix the sources parameter")
    return out


@task(retries=2, retry_delay_seconds=[5, 30], cache_policy=INPUTS + TASK_SOURCE,
      cache_expiration=timedelta(days=1), persist_result=True)
def download(sources: list[str], cache_dir: str) -> list[dict]:
    """Fetch every source into the on-disk cache; returns their provenance (what, from where, sha256)."""
    from gptmini.data.sources import Cache, open_source

    logger = get_run_logger()
    provenance: list[dict] = []
    for spec in sources:
        records = open_source(spec, cache=Cache(Path(cache_dir))).provenance
        logger.info("%s: %d input(s), %s", redact(spec), len(records), ", ".join(str(r.get("sha256", "?"))[:12] for r in records))
        provenance += records
    return provenance


def shards_dir(sources: list[str], provenance: list[dict], tokenizer: str, val_fraction: float, data_root: str) -> Path:
    """Content-addressed: the same sources with the same content and settings give the same folder."""
    key = json.dumps([sources, sorted(str(p.get("sha256")) for p in provenance), tokenizer, val_fraction])
    return Path(data_root) / f"shards-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@task(retries=1, cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def tokenize(sources: list[str], provenance: list[dict], tokenizer: str, val_fraction: float, data_root: str) -> dict:
    """`gptmini prepare` into a content-addressed folder; returns it with its manifest's sha256."""
    out = shards_dir(sources, provenance, tokenizer, val_fraction, data_root)
    cmd = [sys.executable, "-m", "gptmini.cli", "prepare", *sources, "--out", str(out),
           "--tokenizer", tokenizer, "--val-fraction", str(val_fraction)]
    code, tail = run_streaming(cmd, subprocess_env(GPTMINI_CACHE_DIR=str(Path(data_root) / "cache")))
    if code != 0:
        raise RuntimeError(f"gptmini prepare failed (exit code {code}): {tail[-1] if tail else 'no output'}")
    manifest = (out / "manifest.json").read_bytes()
    return {"data_dir": str(out), "manifest_sha256": hashlib.sha256(manifest).hexdigest()}


# Training and evaluation


def torchrun_args(nproc: int, nnodes: int, rdzv_endpoint: str, rdzv_id: str) -> list[str]:
    """One node: --standalone (a free local port). Several: torchrun's c10d rendezvous, nothing of ours."""
    if nnodes == 1:
        return ["--standalone", f"--nproc-per-node={nproc}"]
    return [f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]


@task(retry_condition_fn=_retry_training, retry_delay_seconds=10)
def train(preset: str, data_dir: str, run_dir: str, steps: int | None, nproc: int, parallel: str, device: str,
          extra_args: list[str], mlflow_run_id: str, mlflow_uri: str, run_name: str, nnodes: int = 1,
          rdzv_endpoint: str = "") -> dict:
    """torchrun -m gptmini.train; its output streams into this task's log. Resumes from run_dir's last
    checkpoint (`--resume auto`), so a retry continues where the failed attempt stopped."""
    trainer = ["-m", "gptmini.train", "--preset", preset, "--data-dir", data_dir, "--out", run_dir,
               "--parallel", parallel, "--device", device, "--resume", "auto",
               "--tracking-uri", mlflow_uri, "--mlflow-run-id", mlflow_run_id, "--run-name", run_name]
    trainer += (["--steps", str(steps)] if steps is not None else []) + list(extra_args)
    launcher = torchrun_args(nproc, nnodes, rdzv_endpoint, mlflow_run_id)
    if nnodes > 1:  # data_dir and run_dir must be on storage that every node sees at the same path
        get_run_logger().info("waiting for %d more node(s); start this on each of them:\n  torchrun %s %s",
                              nnodes - 1, " ".join(launcher), " ".join(trainer))
    code, tail = run_streaming([sys.executable, "-m", "torch.distributed.run", *launcher, *trainer], subprocess_env())
    if code != 0:
        raise explain_training_failure(code, tail)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    if summary["status"] != "completed":  # SIGTERM (preemption): the trainer saved a checkpoint and exited 0
        raise TrainingFailed(f"training stopped early ({summary['status']} at step {summary['steps']}); "
                             "a retry resumes from the checkpoint it saved", retryable=True)
    return summary


@task
def evaluate(weights_dir: str, data_dir: str) -> dict:
    """Val loss and perplexity of a model folder on the whole held-out split of `data_dir`."""
    return registry.evaluate_weights(weights_dir, data_dir)


@task
def export_best(run_dir: str) -> str:
    """The best checkpoint's weights alone (safetensors + config.json), the folder that gets registered."""
    from gptmini.weights import load_pretrained, save_pretrained

    model, _ = load_pretrained(Path(run_dir) / "checkpoints" / "best")
    out = Path(run_dir) / "registry-weights"
    save_pretrained(model, out)
    return str(out)


@task
def samples(weights_dir: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy, temperature and top-k continuations of each prompt, for the report."""
    from gptmini.weights import load_pretrained

    model, tokenizer = load_pretrained(weights_dir)
    model.eval()
    rows = []
    for prompt in prompts:
        for mode, temperature, top_k in SAMPLING:
            text = registry.generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_k=top_k, seed=0)
            rows.append({"mode": mode, "prompt": prompt, "text": text})
            get_run_logger().info("[%s] %r -> %r", mode, prompt, text)
    return rows


# Registry


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_io)
def register(run_id: str, weights_dir: str, tags: dict[str, str], model_name: str) -> str:
    mc = registry.client(tracking_uri())
    version = registry.log_model_version(mc, run_id, weights_dir, tags, name=model_name)
    get_run_logger().info("registered %s version %s (alias challenger)", model_name, version.version)
    return str(version.version)


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_io)
def gate(version: str, weights_dir: str, val_loss: float, data_dir: str, promotion: str, min_improvement: float,
         model_name: str) -> dict:
    """Champion/challenger: promote the new version only if it beats production on the same val data."""
    mc = registry.client(tracking_uri())
    decision = registry.champion_challenger(mc, version, weights_dir, val_loss, data_dir, promotion,
                                            min_improvement, model_name)
    get_run_logger().info("gate: %s (%s)", "promoted" if decision.promote else "not promoted", decision.reason)
    return asdict(decision)


# The MLflow run the flow owns


def _find_run(mc, experiment_id: str, flow_run_id: str):
    runs = mc.search_runs([experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=1)
    return runs[0] if runs else None


def open_mlflow_run(experiment: str, tags: dict[str, str]) -> tuple[str, str]:
    """(experiment id, run id): this flow run's MLflow run, created once and reopened on a retry."""
    mc = registry.client(tracking_uri())
    exp = mc.get_experiment_by_name(experiment)
    if exp is None:
        local = None if tracking_uri().startswith("http") else (state_dir() / "mlflow" / "artifacts").as_uri()
        experiment_id = mc.create_experiment(experiment, artifact_location=local)
    else:
        experiment_id = exp.experiment_id
    run = _find_run(mc, experiment_id, tags["prefect.flow_run_id"])
    if run is None:
        run = mc.create_run(experiment_id, tags=tags, run_name=tags.get("mlflow.runName"))
    else:
        mc.update_run(run.info.run_id, status="RUNNING")
    return experiment_id, run.info.run_id


def _end_mlflow_run(status: str):
    def hook(flow, flow_run, state) -> None:
        mc = registry.client(tracking_uri())
        exp = mc.get_experiment_by_name(flow_run.parameters.get("experiment", registry.EXPERIMENT_NAME))
        run = exp and _find_run(mc, exp.experiment_id, str(flow_run.id))
        if run is not None:
            mc.set_tag(run.info.run_id, "prefect.final_state", f"{state.type.value}: {state.message or ''}"[:5000])
            mc.set_terminated(run.info.run_id, status)

    hook.__name__ = f"mark_mlflow_run_{status.lower()}"
    return hook


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else "unknown"


def mlflow_links(experiment_id: str, run_id: str, model_name: str, version: str | None) -> dict[str, str]:
    base = tracking_uri().rstrip("/") if tracking_uri().startswith("http") else None
    if base is None:
        return {"run": f"run {run_id} in {tracking_uri()}", "version": f"{model_name} v{version}"}
    return {"run": f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
            "version": f"{base}/#/models/{model_name}/versions/{version}",
            "loss_png": f"{base}/get-artifact?path=plots/loss.png&run_uuid={run_id}"}


def report(metrics: dict, summary: dict, rows: list[dict], decision: dict, links: dict, run_dir: str,
           manifest_sha: str, version: str, model_name: str) -> str:
    def cell(text: str) -> str:  # one markdown table cell, whatever the model wrote
        return text.replace("|", "\\|").replace("\n", " ")

    def link(key: str) -> str:
        url = links[key]
        return f"[{url}]({url})" if url.startswith("http") else url

    lines = [f"# train-gpt: {model_name} v{version}", "",
             "| metric | value |", "|---|---|",
             *(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
               for k, v in {**metrics, **{f"train.{k}": v for k, v in summary.items() if isinstance(v, (int, float))}}.items()),
             "", "## Registry", "",
             f"- version **{version}** of `{model_name}`: {link('version')}",
             f"- gate: **{'promoted to production' if decision['promote'] else 'not promoted'}**: {decision['reason']}",
             f"- MLflow run: {link('run')}",
             f"- data manifest sha256: `{manifest_sha}`", f"- run folder: `{run_dir}`", "",
             "## Samples", "", "| mode | prompt | continuation |", "|---|---|---|",
             *(f"| {r['mode']} | {cell(r['prompt'])} | {cell(repr(r['text']))} |" for r in rows)]
    if "loss_png" in links:
        lines += ["", "## Loss", "", f"![loss curve]({links['loss_png']})"]
    return "\n".join(lines)


@flow(name="train-gpt", on_failure=[_end_mlflow_run("FAILED")], on_crashed=[_end_mlflow_run("FAILED")],
      on_cancellation=[_end_mlflow_run("KILLED")])
def train_gpt(
    preset: str = "demo",
    sources: list[str] = DEFAULT_SOURCES,
    steps: int | None = None,
    nproc: int = 1,
    nnodes: int = 1,
    rdzv_endpoint: str = "",
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    tokenizer: str = "cl100k_base",
    val_fraction: float = 0.05,
    extra_args: list[str] = [],
    promotion: Literal["if-better", "always", "never"] = "if-better",
    min_improvement: float = 0.0,
    prompts: list[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
    train_retries: int = 1,
    experiment: str = registry.EXPERIMENT_NAME,
    model_name: str = registry.MODEL_NAME,
) -> dict:
    """Train gptmini from raw text and register the best checkpoint.

    Args:
        preset: model + training preset (tiny, demo, seed).
        sources: wikipedia:TITLE, http(s)://URL, embedded:python-docs, local files/folders/globs.
        steps: optimizer steps (None: the preset's).
        nproc: processes per node for torchrun (GPUs per node on CUDA).
        nnodes, rdzv_endpoint: several nodes through torchrun's c10d rendezvous at HOST:PORT; the train
            task logs the command to start on the other nodes (shared storage for state/ is assumed).
        parallel: auto (none for 1 process, ddp for more), none, ddp or fsdp.
        extra_args: more `gptmini train` flags, e.g. ["--optim.lr", "1e-3"].
        promotion: if-better (champion/challenger on the same val data), always, or never.
        train_retries: retries of a failed training (each resumes from the last checkpoint).
    """
    from gptmini.config import PRESETS
    from gptmini.tokenizer import KNOWN as KNOWN_TOKENIZERS

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
    if nproc < 1 or (steps is not None and steps < 1) or train_retries < 0:
        raise ValueError(f"nproc ({nproc}) and steps ({steps}) must be >= 1 and train_retries ({train_retries}) >= 0")
    if nnodes > 1 and ":" not in rdzv_endpoint:
        raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint='HOST:PORT' (a host every node reaches); "
                         f"got {rdzv_endpoint!r}")
    if tokenizer not in KNOWN_TOKENIZERS:
        raise ValueError(f"tokenizer {tokenizer!r} is unknown; choose one of: {', '.join(KNOWN_TOKENIZERS)}")
    if not 0.0 < val_fraction < 1.0:  # stricter than `gptmini prepare`'s [0, 1): evaluate and the gate need a val split
        raise ValueError(f"val_fraction ({val_fraction}) must be in (0, 1), e.g. 0.05 holds out 5% of documents")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    registry.check_model_name(model_name)  # before a version is registered under it, not after
    sources = check_sources(sources)
    parallel = ("none" if nproc * nnodes == 1 else "ddp") if parallel == "auto" else parallel

    state = state_dir()
    flow_run_id = str(current_flow_run.id)
    run_dir = state / "runs" / flow_run_id
    commit = git_commit()
    experiment_id, run_id = open_mlflow_run(experiment, {
        "prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": str(current_flow_run.name),
        "mlflow.runName": str(current_flow_run.name), "git_commit": commit, "preset": preset,
        "prefect.flow_run_url": str(current_flow_run.ui_url or ""),
    })
    mc = registry.client(tracking_uri())
    for key, value in {"flow.sources": redact(json.dumps(sources)), "flow.nproc": nproc, "flow.promotion": promotion}.items():
        mc.log_param(run_id, key, value)  # the same value again on a retried flow run is allowed

    provenance = download(sources, str(state / "data" / "cache"))
    data_args = (sources, provenance, tokenizer, val_fraction, str(state / "data"))
    # A cached result is only good while its shards are on disk: if they were deleted, re-run and re-cache.
    shards_present = (shards_dir(*data_args) / "manifest.json").exists()
    data = (tokenize if shards_present else tokenize.with_options(refresh_cache=True))(*data_args)
    mc.set_tag(run_id, "data_manifest_sha256", data["manifest_sha256"])
    mc.log_artifact(run_id, str(Path(data["data_dir"]) / "manifest.json"), "data")

    summary = train.with_options(retries=train_retries)(
        preset, data["data_dir"], str(run_dir), steps, nproc, parallel, device, extra_args, run_id,
        tracking_uri(), str(current_flow_run.name), nnodes, rdzv_endpoint)
    weights = export_best(str(run_dir))
    metrics = evaluate(weights, data["data_dir"])
    for key, value in metrics.items():
        mc.log_metric(run_id, f"final.{key}", value)
    rows = samples(weights, prompts, max_new_tokens)
    mc.log_text(run_id, json.dumps(rows, indent=1), "samples.json")

    version = register(run_id, weights, {
        "data_manifest_sha256": data["manifest_sha256"], "val_loss": f"{metrics['val_loss']:.6f}",
        "git_commit": commit, "preset": preset, "prefect.flow_run_id": flow_run_id,
    }, model_name)
    decision = gate(version, weights, metrics["val_loss"], data["data_dir"], promotion, min_improvement, model_name)
    mc.set_tag(run_id, "registered_version", version)
    mc.set_tag(run_id, "gate.decision", "promoted" if decision["promote"] else "rejected")

    links = mlflow_links(experiment_id, run_id, model_name, version)
    create_markdown_artifact(report(metrics, summary, rows, decision, links, str(run_dir), data["manifest_sha256"],
                                    version, model_name), key="train-gpt-report",
                             description=f"{model_name} v{version}: metrics, samples, registry decision")
    if "loss_png" in links:
        create_image_artifact(links["loss_png"], key="loss-curve", description="train/val loss (from MLflow)")
    mc.set_terminated(run_id, "FINISHED")
    return {"version": version, "promoted": decision["promote"], "val_loss": metrics["val_loss"],
            "mlflow_run_id": run_id, "run_dir": str(run_dir), "data_dir": data["data_dir"], "samples": rows}


if __name__ == "__main__":
    print(json.dumps(train_gpt(), indent=1))
