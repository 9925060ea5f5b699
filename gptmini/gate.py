"""The champion/challenger gate: after each registration, promote the new version only if it beats
production on the same validation tokens, and record why on the version either way."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from gptmini.errors import UserError
from gptmini.evaluate import evaluate_weights
from gptmini.registry import MODEL_NAME, PRODUCTION, promote, resolve_model_uri, version_by_alias
from gptmini.weights import load_config

POLICIES = ("if-better", "always", "never")


@dataclass
class Decision:
    """The champion/challenger gate's verdict, recorded on the version and in the flow's report."""

    promote: bool
    reason: str
    challenger_version: str
    challenger_val_loss: float
    champion_version: str | None = None
    champion_val_loss: float | None = None

    def __post_init__(self) -> None:  # MLflow hands versions out as int or str depending on the call
        self.challenger_version = str(self.challenger_version)
        self.champion_version = None if self.champion_version is None else str(self.champion_version)


def decide(challenger_version: str, challenger_val_loss: float, champion_version: str | None = None,
           champion_val_loss: float | None = None, min_improvement: float = 0.0) -> Decision:
    """Promote when there is no champion yet, or when the challenger's val loss, measured on the same
    validation tokens as the champion's, is lower by more than `min_improvement`."""
    if champion_version is None:
        return Decision(True, "no production version yet", challenger_version, challenger_val_loss)
    if champion_val_loss is None:
        raise ValueError("champion_val_loss is needed to compare against a champion")
    better = challenger_val_loss < champion_val_loss - min_improvement
    verb = "beats" if better else "does not beat"
    reason = (f"v{challenger_version} val loss {challenger_val_loss:.4f} {verb} production "
              f"v{champion_version} {champion_val_loss:.4f} on the same validation data"
              + (f" by more than {min_improvement}" if min_improvement else ""))
    return Decision(better, reason, challenger_version, challenger_val_loss, champion_version, champion_val_loss)


def record_decision(mlflow_client, decision: Decision, name: str = MODEL_NAME) -> None:
    """Tags on the challenger version: `gate.decision` (promoted|rejected), `gate.reason`, the losses."""
    tags = {"gate.decision": "promoted" if decision.promote else "rejected", "gate.reason": decision.reason,
            "gate.json": json.dumps(asdict(decision))}
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, decision.challenger_version, key, value)


def max_seq_len(weights_dir: str | Path) -> int:
    return load_config(weights_dir).max_seq_len


def against_champion(mlflow_client, version: str, weights_dir: str | Path, data_dir: str | Path, champion,
                     min_improvement: float = 0.0, name: str = MODEL_NAME, val_loss: float | None = None) -> Decision:
    """`decide` between `version` (its weights in `weights_dir`) and the `champion` ModelVersion, both
    evaluated on the same tokens of `data_dir` in windows of the shorter of their max_seq_len. `val_loss`,
    the challenger's loss in windows of its own max_seq_len, is reused when those are the windows."""
    champion_dir = resolve_model_uri(f"models:/{name}/{champion.version}", mlflow_client.tracking_uri)
    seq_len = min(max_seq_len(weights_dir), max_seq_len(champion_dir))
    if val_loss is None or seq_len != max_seq_len(weights_dir):
        val_loss = evaluate_weights(weights_dir, data_dir, seq_len)["val_loss"]
    champion_loss = evaluate_weights(champion_dir, data_dir, seq_len)["val_loss"]
    return decide(version, val_loss, champion.version, champion_loss, min_improvement)


def champion_challenger(mlflow_client, version: str, weights_dir: str | Path, val_loss: float,
                        data_dir: str | Path, policy: str = "if-better", min_improvement: float = 0.0,
                        name: str = MODEL_NAME) -> Decision:
    """The gate after each registration. policy `if-better`: promote `version` (its weights in
    `weights_dir`, its `val_loss` measured by evaluate_weights on `data_dir`) only if there is no production
    version yet or it beats production (`against_champion`); `always` / `never` skip the comparison. The
    decision is recorded on the version either way."""
    if policy not in POLICIES:
        raise UserError(f"promotion policy {policy!r} is unknown; use one of: {', '.join(POLICIES)}")
    champion = version_by_alias(mlflow_client, PRODUCTION, name)
    if policy == "never":
        decision = Decision(False, "promotion policy 'never'", version, val_loss)
    elif policy == "always":
        decision = Decision(True, "promotion policy 'always'", version, val_loss)
    elif champion is None:
        decision = decide(version, val_loss)
    else:
        decision = against_champion(mlflow_client, version, weights_dir, data_dir, champion, min_improvement,
                                    name, val_loss)
    record_decision(mlflow_client, decision, name)
    if decision.promote:
        promote(mlflow_client, version, PRODUCTION, name, reason=decision.reason)
    return decision
