"""The `train-gpt` flow: raw text -> token shards -> torchrun training -> evaluation -> samples -> registry.

    download -> [nothing new? stop] -> tokenize -> train (torchrun) -> evaluate -> samples -> register -> gate

Day two (`init_from="production"`, the `retrain` deployment): the sources plus an incoming folder are
tokenized against production's dataset (only new inputs are tokenized; the manifest marks them), training
continues from production's weights on the new documents with a share of replayed old ones, for a number of
steps set by the new text (`gptmini.retrain.continue_steps`), and the gate reports bits per byte on the new
and the old val text. When nothing is new since production's dataset, the run ends Completed at once,
training and registering nothing (`force=True` runs anyway).

The flow owns the MLflow run: it creates it, the trainer logs into it (and never ends it), and the flow
ends it FINISHED, or FAILED / KILLED from its state hooks. The tasks are in flows/tasks.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed

from flows import tasks
from flows.report import mlflow_links, publish, report
from gptmini import registry, retrain, tracking
from gptmini import parallel as parallel_
from gptmini.cli.train import parse_args as parse_train_args
from gptmini.data.prepare import PrepareConfig, check_config, read_manifest
from gptmini.launch import LAUNCHERS
from gptmini.launch.k8s import K8sOptions
from gptmini.launch.slurm import SlurmOptions
from gptmini.tokenizer import bpe_size

DEFAULT_SOURCES = ["embedded:python-docs"]
DEFAULT_PROMPTS = ["The Python interpreter", "A list comprehension", "def main():"]


def end_mlflow_run(status: str):
    """A state hook that ends the flow run's MLflow run with `status`."""
    def hook(flow, flow_run, state) -> None:
        experiment = flow_run.parameters.get("experiment", tracking.EXPERIMENT_NAME)
        tracking.end_flow_run(tasks.tracking_uri(), experiment, str(flow_run.id), status,
                              f"{state.type.value}: {state.message or ''}")

    hook.__name__ = f"mark_mlflow_run_{status.lower()}"
    return hook


def check_sources(sources: list[str]) -> list[str]:
    """Validate the sources at the flow's boundary (before any retrying task); local paths become absolute."""
    if not sources:
        raise ValueError("sources is empty; give at least one, e.g. ['embedded:python-docs'] or ['wikipedia:Python']")
    out = []
    for spec in sources:
        path = Path(spec).expanduser()
        if spec.startswith(tasks.SCHEMES):
            out.append(spec)
        elif path.exists():
            out.append(str(path.resolve()))
        elif any(ch in spec for ch in "*?["):  # a glob: prepare expands it
            out.append(spec)
        else:
            raise ValueError(f"source {spec!r} is not wikipedia:TITLE, http(s)://URL, embedded:NAME or an "
                             "existing local path; fix the sources parameter")
    return out


def check_data_parameters(tokenizer: str, val_fraction: float) -> None:
    """prepare's own checks of the tokenizer and val_fraction, and a val split that is not empty."""
    check_config(PrepareConfig(sources=["checked apart"], out=Path("shards"), tokenizer=tokenizer,
                               val_fraction=val_fraction))
    if val_fraction == 0:  # prepare allows none; evaluation and the gate need a val split
        raise ValueError("val_fraction (0) must be in (0, 1), e.g. 0.05 holds out 5% of the text")


def check_parameters(preset: str, steps: int | None, nproc: int, nnodes: int, rdzv_endpoint: str, tokenizer: str,
                     val_fraction: float, max_new_tokens: int, train_retries: int, model_name: str,
                     launcher: str = "local", slurm: SlurmOptions | None = None, parallel: str = "none",
                     extra_args: list[str] = ()) -> None:
    """The library's own validators on what the tasks will pass, before any task runs: the trainer's parser
    on the train flags (preset, steps, layout, extra_args; the shards folder is made later), the layout
    against nproc x nnodes ranks, and prepare's checks of the tokenizer and val_fraction."""
    cfg = parse_train_args(["--preset", preset, "--data-dir", "shards", *(["--steps", str(steps)] if steps is not None else []),
                            *parallel_.mesh_args(parallel), *extra_args])
    if nproc < 1 or nnodes < 1 or train_retries < 0:
        raise ValueError(f"nproc ({nproc}) and nnodes ({nnodes}) must be >= 1 and train_retries ({train_retries}) >= 0")
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r} is unknown; choose one of: {', '.join(LAUNCHERS)}")
    if launcher == "local" and nnodes > 1 and ":" not in rdzv_endpoint:
        raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint='HOST:PORT' (a host every node reaches); "
                         f"got {rdzv_endpoint!r}, or use launcher='slurm', which finds it")
    if slurm is not None:
        slurm.check()
    t = cfg.train
    parallel_.mesh_dims(nproc * nnodes, t.parallel, t.dp_shard, t.tp, t.ep, cfg.model)
    check_data_parameters(tokenizer, val_fraction)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 1")
    registry.check_model_name(model_name)  # before a version is registered under it, not after


@flow(name="train-gpt", on_failure=[end_mlflow_run("FAILED")], on_crashed=[end_mlflow_run("FAILED")],
      on_cancellation=[end_mlflow_run("KILLED")])
def train_gpt(
    preset: str = "demo",
    sources: list[str] = DEFAULT_SOURCES,
    steps: int | None = None,
    nproc: int = 1,
    nnodes: int = 1,
    rdzv_endpoint: str = "",
    launcher: Literal["local", "slurm", "k8s"] = "local",
    slurm: SlurmOptions = SlurmOptions(),
    k8s: K8sOptions = K8sOptions(),
    parallel: str = "auto",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    tokenizer: str = "cl100k_base",
    val_fraction: float = 0.05,
    extra_args: list[str] = [],
    promotion: Literal["if-better", "always", "never"] = "if-better",
    min_improvement: float = 0.0,
    prompts: list[str] = DEFAULT_PROMPTS,
    max_new_tokens: int = 32,
    train_retries: int = 1,
    experiment: str = tracking.EXPERIMENT_NAME,
    model_name: str = registry.MODEL_NAME,
    incoming: str = "",
    init_from: str = "",
    replay: float = 0.25,
    force: bool = False,
) -> dict:
    """Train gptmini from raw text and register the best checkpoint.

    Args:
        preset: model + training preset (tiny, demo, seed).
        sources: wikipedia:TITLE, http(s)://URL, embedded:python-docs, local files/folders/globs.
        steps: optimizer steps (None: the preset's).
        nproc: processes per node for torchrun (GPUs per node on CUDA).
        nnodes, rdzv_endpoint: several nodes through torchrun's c10d rendezvous at HOST:PORT; with the local
            launcher the train task logs the command to start on the other nodes (shared storage for state/
            is assumed).
        launcher: local (torchrun here), slurm (one sbatch job over nnodes nodes, followed into this log;
            cancelling the flow run scancels it) or
            k8s (one Kubeflow Trainer TrainJob, followed likewise; checked against Trainer's API, not yet run on a
            cluster).
        slurm: the Slurm job's partition, account, time_limit, gpus_per_node, sbatch_lines and requeue.
        k8s: the TrainJob's image, namespace, gpus_per_node, state_claim (mounted at /state) and runtime.
        parallel: auto (none for 1 process, ddp for more), none, ddp or fsdp, or a device mesh: parts joined
            by '+' from fsdp[:N], tp:N, ep:N (e.g. 'fsdp+tp:2': tensor parallel in pairs, FSDP across them;
            'fsdp+ep:2': the experts split over pairs), checked against nproc x nnodes up front.
        tokenizer: cl100k_base (the demo's), gpt2, o200k_base, or bpe:N to train a byte-level BPE of N ids on
            the corpus's train split (e.g. bpe:8192); a run continuing from production reads its data with
            production's trained BPE.
        val_fraction: the share of the text held out for validation, dealt in chunks of about 256 tokens.
        extra_args: more `gptmini train` flags, e.g. ["--optim.lr", "1e-3"].
        promotion: if-better (promote only when bits per byte, paired with production's on the same val text,
            is lower by more than 2 standard errors), always, or never.
        min_improvement: with if-better, the least improvement in bits per byte that promotes.
        train_retries: retries of a failed training (each resumes from the last checkpoint); a bad
            configuration or bad data is never retried.
        incoming: a folder of new text files read with the sources when it holds any (the retrain deployment's
            is $GPTMINI_STATE/incoming); missing or empty, it adds nothing.
        init_from: "" trains from scratch; "production" continues from the production version (from scratch
            while there is none) on the documents new since its dataset, with `replay`; or a run, weights or
            checkpoint folder, or a models:/ URI, to start from.
        replay: when continuing from production, the share of each batch replayed from the earlier documents.
        force: with init_from="production", train even when the inputs are those of production's dataset.
    """
    parallel = ("none" if nproc * nnodes == 1 else "ddp") if parallel == "auto" else parallel
    check_parameters(preset, steps, nproc, nnodes, rdzv_endpoint, tokenizer, val_fraction, max_new_tokens,
                     train_retries, model_name, launcher, slurm, parallel, extra_args)
    if not 0.0 <= replay < 1.0:
        raise ValueError(f"replay ({replay}) must be in [0, 1), e.g. 0.25: a quarter of each batch from earlier text")
    sources = check_sources(sources) + tasks.incoming_sources(incoming)

    state, uri = tasks.state_dir(), tasks.tracking_uri()
    inputs = tasks.fetch(sources, str(state / "data" / "cache"))
    mc = registry.client(uri) if init_from == "production" else None
    parent = registry.version_by_alias(mc, registry.PRODUCTION, model_name) if mc else None
    settings = retrain.settings_key(preset=preset, steps=steps, tokenizer=tokenizer, val_fraction=val_fraction,
                                    extra_args=extra_args, init_from=init_from, replay=replay, nproc=nproc * nnodes)
    inputs_key = tasks.shards_key(inputs, tokenizer, val_fraction)
    # Only a run that carries production on skips: one from scratch is an explicit request to train.
    reason = parent and retrain.skip_reason(parent.tags, parent.version, inputs_key, settings, continuing=True,
                                            earlier=registry.version_tags(mc, model_name))
    if reason and not force:
        get_run_logger().info("nothing to train: %s; force=True trains anyway", reason)
        publish_skip(reason, parent.version, model_name, sources)
        return Completed(message=reason, data={"skipped": True, "reason": reason, "version": None,
                                               "production": str(parent.version)})

    flow_run_id, name = str(current_flow_run.id), str(current_flow_run.name)
    run_dir = state / "runs" / flow_run_id
    commit = tasks.git_commit()
    run = tracking.open_flow_run(uri, experiment, flow_run_id, {
        "prefect.flow_run_name": name, "mlflow.runName": name, "git_commit": commit, "preset": preset,
        "prefect.flow_run_url": str(current_flow_run.ui_url or ""),
    }, artifact_root=state / "mlflow" / "artifacts")
    run.log_params({"flow.sources": json.dumps(sources), "flow.nproc": nproc, "flow.promotion": promotion,
                    "flow.init_from": init_from, "flow.parent_version": parent.version if parent else ""})

    since = tasks.parent_manifest(str(parent.version), model_name, str(state / "data")) if parent else ""
    data_tokenizer = tokenizer
    if parent is not None and bpe_size(tokenizer):
        # "Train a BPE" was done on day one: a continued model reads the new text with the ids it knows.
        data_tokenizer = tasks.parent_tokenizer(str(parent.version), model_name)
    data = tasks.prepare_shards(inputs, data_tokenizer, val_fraction, str(state / "data"), since)
    run.set_tags({"data_manifest_sha256": data["manifest_sha256"]})
    run.log_artifact(Path(data["data_dir"]) / "manifest.json", "data")
    manifest = read_manifest(data["data_dir"])
    new = manifest.get("since", {})
    if parent is not None:
        run.log_dataset(Path(since))  # the data the parent learned, which this run carries on from
        init_args = ["--init-from", f"models:/{model_name}/{parent.version}"]
        if new.get("new_tokens", {}).get("train", 0) > 0:
            init_args += ["--replay", str(replay)]
            if steps is None:
                steps = continue_steps(preset, extra_args, data["data_dir"], nproc * nnodes, new["new_tokens"]["train"],
                                       replay)
        get_run_logger().info("continuing from %s v%s on %d new document(s) (%s new train tokens), replay %s, "
                              "%s steps", model_name, parent.version, new.get("new_documents", 0),
                              f"{new.get('new_tokens', {}).get('train', 0):,}", replay, steps or "the preset's")
        extra_args = [*extra_args, *init_args]
    elif init_from and init_from != "production":
        extra_args = [*extra_args, "--init-from", init_from]

    summary = tasks.train.with_options(retries=train_retries)(
        preset, data["data_dir"], str(run_dir), steps, nproc, parallel, device, extra_args, run.run_id, uri, name,
        nnodes, rdzv_endpoint, launcher, slurm, k8s)
    weights = tasks.export_best(str(run_dir))
    # The registered weights (the best checkpoint) over every val window: the numbers the version carries.
    metrics = tasks.evaluate(weights, data["data_dir"])
    retrieval = tasks.evaluate_rag(weights, data["data_dir"])
    rows = tasks.samples(weights, prompts, max_new_tokens, data["data_dir"])
    run.log_text(json.dumps(rows, indent=1), "samples.json")

    run_tokens = summary.get("tokens", 0)
    parent_total = int(parent.tags.get("total_tokens", 0) or 0) if parent else 0
    lineage = {"parent_version": str(parent.version) if parent else "", "data_inputs_key": inputs_key,
               "train_settings": settings, "new_documents": str(new.get("new_documents", "")),
               "new_inputs": str(new.get("new_inputs", "")), "run_steps": str(summary.get("steps", "")),
               "run_tokens": str(run_tokens), "total_tokens": str(parent_total + run_tokens)}
    measured = {k: f"{metrics[k]:.6f}" for k in ("val_bpb_new", "val_bpb_old") if metrics.get(k) is not None}
    if manifest.get("index"):  # the index of this version's training data travels with it, named by its sha256
        run.log_artifact(Path(data["data_dir"]) / manifest["index"]["file"], "retrieval")
        measured |= registry.index_tags(run.run_id, manifest["index"])
    if retrieval:  # the leakage-filtered figure: retrieval that never reads the val text's own document
        f = retrieval["filtered"]
        measured |= {"rag.filtered_val_bpb": f"{f['val_bpb']:.6f}", "rag.filtered_difference_bpb": f"{f['difference']:.6f}",
                     "rag.filtered_standard_error_bpb": f"{f['standard_error']:.6f}",
                     "rag.val_bpb_without": f"{retrieval['val_bpb']:.6f}"}
        run.log_metrics({"rag_filtered_val_bpb": f["val_bpb"], "rag_val_bpb_without": retrieval["val_bpb"]})
    with tasks.registry_lock():  # the gate decides against the production version no other run is moving
        version = tasks.register(run.run_id, weights, {
            "data_manifest_sha256": data["manifest_sha256"], "val_loss": f"{metrics['val_loss']:.6f}",
            "val_bpb": f"{metrics['val_bpb']:.6f}", "tokenizer": manifest["tokenizer"],
            "tokenizer_sha256": manifest.get("tokenizer_sha256") or "",
            "git_commit": commit, "preset": preset, "prefect.flow_run_id": flow_run_id, **lineage, **measured,
        }, model_name, summary.get("mlflow_models", {}).get("best"))
        decision = tasks.gate(version, weights, metrics["val_bpb"], data["data_dir"], promotion, min_improvement,
                              model_name)
    run.set_tags({"registered_version": version, "gate.decision": "promoted" if decision["promote"] else "rejected"})

    links = mlflow_links(uri, run.experiment_id, run.run_id, model_name, version)
    publish(report(metrics, summary, rows, decision, links, str(run_dir), data["manifest_sha256"], version,
                   model_name, lineage, retrieval), links, version, model_name)
    run.end("FINISHED")
    return {"version": version, "promoted": decision["promote"], "val_loss": metrics["val_loss"],
            "val_bpb": metrics["val_bpb"], "decision": decision, "mlflow_run_id": run.run_id,
            "run_dir": str(run_dir), "data_dir": data["data_dir"], "samples": rows, "retrieval": retrieval}


def continue_steps(preset: str, extra_args: list[str], data_dir: str, world: int, new_train_tokens: int,
                   replay: float) -> int:
    """`gptmini.retrain.continue_steps` under the run's own config (the preset with extra_args): its tokens per
    step, and its steps as the cap."""
    cfg = parse_train_args(["--preset", preset, "--data-dir", data_dir, *extra_args])
    per_step = cfg.data.batch_size * cfg.seq_len * cfg.train.grad_accum * world
    return retrain.continue_steps(new_train_tokens, per_step, replay, cap=cfg.train.steps)


def publish_skip(reason: str, production: str, model_name: str, sources: list[str]) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact("\n".join([
        f"# train-gpt: nothing to train", "", f"- **skipped**: {reason}", f"- production: {model_name} v{production}",
        f"- sources: {', '.join(f'`{s}`' for s in sources)}", "",
        "Drop new text files into the incoming folder, or run with `force=True` to train anyway."]),
        key="train-gpt-report", description=f"nothing to train: {reason}")


if __name__ == "__main__":
    print(json.dumps(train_gpt(), indent=1))
