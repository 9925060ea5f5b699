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
           manifest_sha: str, version: str, model_name: str, lineage: dict | None = None,
           retrieval: dict | None = None) -> str:
    """`metrics`: the registered weights over every val window (evaluate's names); then the trainer's
    summary (its last and best evaluations under the same names) and the gate's paired comparison."""
    training = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    evaluations = {"registered (best checkpoint)": {"step": summary.get("best_step"), **metrics},
                   "training's last evaluation": summary.get("final"), "training's best evaluation": summary.get("best")}
    names = ("step", "val_bpb", "val_loss", "val_perplexity", "val_tokens", "val_bytes")
    lines = [f"# train-gpt: {model_name} v{version}", "",
             "| evaluation | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             *(f"| {label} | " + " | ".join(_value(m.get(k)) for k in names) + " |"
               for label, m in evaluations.items() if m),
             "", "val_bpb: bits per byte of val text (tokenizer-independent); val_loss: nats per token.", "",
             *_new_and_old(metrics, decision),
             *_retrieval(retrieval),
             "| training | value |", "|---|---|", *(_row(k, v) for k, v in training.items()),
             "", "## Registry", "",
             f"- version **{version}** of `{model_name}`: {_link(links['version'])}",
             f"- gate: **{'promoted to production' if decision['promote'] else 'not promoted'}**: {decision['reason']}"]
    if decision.get("difference") is not None:
        lines.append(f"- paired difference (production - this version): {decision['difference']:+.4f} bits/byte, "
                     f"standard error {decision['standard_error']:.4f}, over {decision['pieces']} val pieces")
    lineage = lineage or {}
    if lineage.get("parent_version"):
        lines.append(f"- continued from **v{lineage['parent_version']}** on {lineage.get('new_documents') or 0} new "
                     f"document(s): {lineage.get('run_steps')} steps, {int(lineage.get('run_tokens') or 0):,} tokens "
                     f"this run, {int(lineage.get('total_tokens') or 0):,} since scratch")
    lines += [f"- MLflow run: {_link(links['run'])}",
              f"- data manifest sha256: `{manifest_sha}`", f"- run folder: `{run_dir}`", "",
              "## Samples", "", "| mode | prompt | continuation |", "|---|---|---|",
              *(f"| {r['mode']} | {_cell(r['prompt'])} | {_cell(repr(r['text']))} |" for r in rows)]
    if "loss_png" in links:
        lines += ["", "## Loss", "", f"![loss curve]({links['loss_png']})"]
    return "\n".join(lines)


def _retrieval(r: dict | None) -> list[str]:
    """The four retrieval figures (docs/rag.md); the filtered one is what the version carries."""
    if not r:
        return []
    lines = ["| retrieval (In-Context RALM, top-1 BM25) | val_bpb | difference (without - with) | s.e. |",
             "|---|---|---|---|", f"| without retrieval | {_value(r['val_bpb'])} | | |"]
    for mode, label in (("filtered", "**own document excluded** (leakage-filtered)"), ("all", "from every passage"),
                        ("random", "a random passage as long")):
        if mode not in r:
            continue
        m = r[mode]
        lines.append(f"| {label} | {_value(m['val_bpb'])} | {m['difference']:+.4f} | {m['standard_error']:.4f} |")
    rec = r["recall"]
    return lines + ["", "recall on held-out queries: " + ", ".join(
        f"{k} {v:.3f}" for k, v in rec.items() if k != "queries" and v is not None) + f" ({rec['queries']} queries)", ""]


def _new_and_old(metrics: dict, decision: dict) -> list[str]:
    """Bits per byte on the new documents' val text (did it learn them?) and on the old (did it forget?)."""
    if metrics.get("val_bpb_new") is None:
        return []
    champion = decision.get("parts") or {}
    lines = ["| val text | this version (bits/byte) | production (bits/byte) |", "|---|---|---|"]
    for part in ("new", "old"):
        theirs = champion.get(f"champion_{part}")
        lines.append(f"| {part} documents | {_value(metrics.get(f'val_bpb_{part}'))} | {_value(theirs)} |")
    return [*lines, ""]


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else f"{v:,}" if isinstance(v, int) else str(v)


def publish(markdown: str, links: dict, version: str, model_name: str) -> None:
    """The report, and the loss curve when MLflow serves it, as the flow run's artifacts."""
    create_markdown_artifact(markdown, key="train-gpt-report",
                             description=f"{model_name} v{version}: metrics, samples, registry decision")
    if "loss_png" in links:
        create_image_artifact(links["loss_png"], key="loss-curve", description="train/val loss (from MLflow)")
