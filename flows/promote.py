"""The `promote-model` flow: point a registry alias (default production, which moves champion too) at a
version, optionally only if it beats the current production version on a validation split."""
from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.tasks import registry_lock, retry_io, tracking_uri
from gptmini import registry
from gptmini.gate import Decision, against_champion, record_decision


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_io)
def promote_version(version: int, alias: str, model_name: str, data_dir: str | None) -> dict:
    mc = registry.client(tracking_uri())
    target = registry.get_version(mc, version, model_name)
    champion = registry.version_by_alias(mc, registry.PRODUCTION, model_name)
    if data_dir and alias == registry.PRODUCTION and champion is not None and champion.version != target.version:
        target_dir = registry.resolve_model_uri(f"models:/{model_name}/{target.version}", tracking_uri())
        decision = against_champion(mc, target.version, target_dir, data_dir, champion, name=model_name)
    else:
        decision = Decision(True, f"manual promotion to {alias}", target.version,
                            float(target.tags.get("val_bpb", "nan")), champion.version if champion else None)
    record_decision(mc, decision, model_name)
    previous = registry.promote(mc, target.version, alias, model_name, reason=decision.reason) if decision.promote else None
    get_run_logger().info("%s@%s: %s (%s)", model_name, alias,
                          f"v{target.version} (was v{previous})" if decision.promote else "unchanged", decision.reason)
    return {**asdict(decision), "alias": alias, "previous": previous}


@flow(name="promote-model")
def promote_model(version: int, alias: str = registry.PRODUCTION, model_name: str = registry.MODEL_NAME,
                  data_dir: str | None = None) -> dict:
    """Move `alias` to `version`. With `data_dir` (a `gptmini prepare` folder) and alias production, the
    move happens only if the version beats the current production version on that validation split."""
    if version < 1:
        raise ValueError(f"version {version} is not a registry version; versions start at 1")
    if not alias.isidentifier():
        raise ValueError(f"alias {alias!r} is not a valid alias; use letters, digits and _")
    with registry_lock():
        result = promote_version(version, alias, model_name, data_dir)
    verdict = "promoted" if result["promote"] else "not promoted"
    create_markdown_artifact(f"# {model_name}@{alias}: v{version} {verdict}\n\n{result['reason']}\n",
                             key="promotion", description=f"{model_name}@{alias} -> v{version}: {verdict}")
    return result
