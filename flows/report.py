"""The train-gpt flow's report: a markdown artifact in Prefect with the metrics, the registry decision, the
samples and links into MLflow."""
from __future__ import annotations

from prefect.artifacts import create_image_artifact, create_markdown_artifact


def mlflow_links(uri: str, experiment_id: str, run_id: str, model_name: str, version: str | None) -> dict[str, str]:
    """Links into the MLflow UI for a server; for a local store, where to find the run and version."""
    if not uri.startswith(("http://", "https://")):
        return {"run": f"run {run_id} in {uri}", "version": f"{model_name} v{version}"}
    base = uri.rstrip("/")
    return {"run": f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
            "version": f"{base}/#/models/{model_name}/versions/{version}",
            "loss_png": f"{base}/get-artifact?path=plots/loss.png&run_uuid={run_id}"}


def _cell(text: str) -> str:
    """One markdown table cell, whatever the model wrote."""
    return text.replace("|", "\\|").replace("\n", " ")


def _link(url: str) -> str:
    return f"[{url}]({url})" if url.startswith("http") else url


def _row(key: str, value) -> str:
    return f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"


def report(metrics: dict, summary: dict, rows: list[dict], decision: dict, links: dict, run_dir: str,
           manifest_sha: str, version: str, model_name: str) -> str:
    """`metrics` under the names the MLflow run has them, then the trainer's summary under its own names."""
    numbers = {**metrics, **{k: v for k, v in summary.items() if isinstance(v, (int, float))}}
    lines = [f"# train-gpt: {model_name} v{version}", "",
             "| metric | value |", "|---|---|", *(_row(k, v) for k, v in numbers.items()),
             "", "## Registry", "",
             f"- version **{version}** of `{model_name}`: {_link(links['version'])}",
             f"- gate: **{'promoted to production' if decision['promote'] else 'not promoted'}**: {decision['reason']}",
             f"- MLflow run: {_link(links['run'])}",
             f"- data manifest sha256: `{manifest_sha}`", f"- run folder: `{run_dir}`", "",
             "## Samples", "", "| mode | prompt | continuation |", "|---|---|---|",
             *(f"| {r['mode']} | {_cell(r['prompt'])} | {_cell(repr(r['text']))} |" for r in rows)]
    if "loss_png" in links:
        lines += ["", "## Loss", "", f"![loss curve]({links['loss_png']})"]
    return "\n".join(lines)


def publish(markdown: str, links: dict, version: str, model_name: str) -> None:
    """The report, and the loss curve when MLflow serves it, as the flow run's artifacts."""
    create_markdown_artifact(markdown, key="train-gpt-report",
                             description=f"{model_name} v{version}: metrics, samples, registry decision")
    if "loss_png" in links:
        create_image_artifact(links["loss_png"], key="loss-curve", description="train/val loss (from MLflow)")
