"""The champion/challenger gate: after each registration, promote the new version only if it beats
production on the same validation tokens, and record why on the version either way."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gptmini.weights import load_model
from gptmini.errors import UserError
from gptmini.evaluate import LN2, new_pieces, piece_sums
from gptmini.registry import MODEL_NAME, PRODUCTION, promote, resolve_model_uri, version_by_alias

POLICIES = ("if-better", "always", "never")
# The challenger must beat production by more than this many standard errors of the paired difference: two
# models trained alike but for the seed differ by about one standard error, and must not swap production.
NOISE_SE = 2.0


@dataclass
class Comparison:
    """Two models on the same val pieces: bits per byte of each, and their paired difference."""

    challenger_val_bpb: float
    champion_val_bpb: float
    difference: float  # champion - challenger, bits per byte: above 0, the challenger is better
    standard_error: float  # of `difference`, from the spread of the per-piece differences
    pieces: int
    val_bytes: int
    # With a dataset that marks new documents: each model's bits per byte on the new and the old val pieces,
    # and the paired difference (champion - challenger) on each part with its standard error.
    parts: dict | None = None


def paired(challenger_nats: np.ndarray, champion_nats: np.ndarray, nbytes: np.ndarray) -> Comparison:
    """The bits-per-byte difference over pieces i, d = sum(champion_i - challenger_i) / sum(bytes_i) / ln 2, and
    its standard error as a ratio estimator's: sqrt(n / (n-1) * sum((d_i - d * bytes_i)^2)) / sum(bytes_i)."""
    bits_a, bits_b, total = challenger_nats / LN2, champion_nats / LN2, nbytes.sum()
    per_piece = bits_b - bits_a
    d = per_piece.sum() / total
    n = len(per_piece)
    se = float(math.sqrt(n / (n - 1) * ((per_piece - d * nbytes) ** 2).sum()) / total) if n > 1 else math.inf
    return Comparison(float(bits_a.sum() / total), float(bits_b.sum() / total), float(d), se, n, int(total))


@dataclass
class Decision:
    """The champion/challenger gate's verdict, recorded on the version and in the flow's report."""

    promote: bool
    reason: str
    challenger_version: str
    challenger_val_bpb: float
    champion_version: str | None = None
    champion_val_bpb: float | None = None
    difference: float | None = None
    standard_error: float | None = None
    pieces: int | None = None
    parts: dict | None = None  # Comparison.parts: new and old val text apart

    def __post_init__(self) -> None:  # MLflow hands versions out as int or str depending on the call
        self.challenger_version = str(self.challenger_version)
        self.champion_version = None if self.champion_version is None else str(self.champion_version)


def decide(challenger_version: str, challenger_val_bpb: float, champion_version: str | None = None,
           comparison: Comparison | None = None, min_improvement: float = 0.0) -> Decision:
    """Promote when there is no champion yet, or when the challenger's bits per byte, paired piece by piece
    with the champion's on the same val text, is lower by more than NOISE_SE standard errors and by more than
    `min_improvement` bits per byte."""
    if champion_version is None:
        return Decision(True, "no production version yet", challenger_version, challenger_val_bpb)
    c = comparison
    need = max(NOISE_SE * c.standard_error, min_improvement)
    better = c.difference > need
    verdict = (f"better by more than {NOISE_SE:g} standard errors" if better else
               f"not better beyond noise (needs more than {need:.4f}: {NOISE_SE:g} standard errors"
               + (f" or min_improvement {min_improvement}" if min_improvement else "") + ")")
    if better and forgot(c.parts):
        # Better overall on the strength of the new text, while worse beyond noise on the text production
        # knew: it learned the new documents by forgetting the old ones.
        better = False
        verdict = (f"better overall, but it forgot the old text: {c.parts['old_difference']:+.4f} ± "
                   f"{c.parts['old_standard_error']:.4f} bits/byte on the old val pieces, worse by more than "
                   f"{NOISE_SE:g} standard errors")
    reason = (f"v{challenger_version} {c.challenger_val_bpb:.4f} vs production v{champion_version} "
              f"{c.champion_val_bpb:.4f} bits/byte on the same {c.pieces} val pieces ({c.val_bytes:,} bytes): "
              f"difference {c.difference:+.4f} ± {c.standard_error:.4f} (1 s.e.), {verdict}")
    return Decision(better, reason, challenger_version, c.challenger_val_bpb, champion_version, c.champion_val_bpb,
                    c.difference, c.standard_error, c.pieces, c.parts)


def forgot(parts: dict | None) -> bool:
    """Worse than the champion on the old val pieces by more than NOISE_SE standard errors."""
    return bool(parts) and parts["old_difference"] < -NOISE_SE * parts["old_standard_error"]


def split_parts(challenger_nats: np.ndarray, champion_nats: np.ndarray, nbytes: np.ndarray,
                new: np.ndarray) -> dict | None:
    """`Comparison.parts`: both models on the new and on the old val pieces, each part paired."""
    if new is None or not new.any() or new.all():
        return None
    out = {}
    for part, mask in (("new", new), ("old", ~new)):
        c = paired(challenger_nats[mask], champion_nats[mask], nbytes[mask])
        out |= {f"challenger_{part}": c.challenger_val_bpb, f"champion_{part}": c.champion_val_bpb,
                f"{part}_difference": c.difference, f"{part}_standard_error": c.standard_error, f"{part}_pieces": c.pieces}
    return out


def record_decision(mlflow_client, decision: Decision, name: str = MODEL_NAME) -> None:
    """Tags on the challenger version: `gate.decision` (promoted|rejected), `gate.reason`, the difference and
    its standard error, and the whole decision as `gate.json`."""
    tags = {"gate.decision": "promoted" if decision.promote else "rejected", "gate.reason": decision.reason,
            "gate.json": json.dumps(asdict(decision))}
    if decision.difference is not None:
        tags |= {"gate.difference_bpb": f"{decision.difference:.6f}",
                 "gate.standard_error_bpb": f"{decision.standard_error:.6f}"}
    for part in ("new", "old") if decision.parts else ():
        tags[f"gate.{part}_difference_bpb"] = f"{decision.parts[f'{part}_difference']:.6f}"
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, decision.challenger_version, key, value)


def compare(challenger_dir: str | Path, champion_dir: str | Path, data_dir: str | Path) -> Comparison:
    """Both models on every val piece of `data_dir`, in windows of the shorter of their max_seq_len; each in
    its own tokens when their tokenizers differ, on the same text."""
    loaded = [load_model(path) for path in (challenger_dir, champion_dir)]
    seq_len = min(model.config.max_seq_len for model, _ in loaded)
    sums = [piece_sums(model, tokenizer, data_dir, seq_len) for model, tokenizer in loaded]
    (nats_a, bytes_a, _), (nats_b, bytes_b, _) = sums
    if not np.array_equal(bytes_a, bytes_b):  # the same text must spell the same bytes in any tokenizer
        raise UserError(f"the two models read different val text from {data_dir} ({int(bytes_a.sum())} vs "
                        f"{int(bytes_b.sum())} bytes); re-run `gptmini prepare ... --force`")
    whole = paired(nats_a, nats_b, bytes_a)
    whole.parts = split_parts(nats_a, nats_b, bytes_a, new_pieces(data_dir))
    return whole


def against_champion(mlflow_client, version: str, weights_dir: str | Path, data_dir: str | Path, champion,
                     min_improvement: float = 0.0, name: str = MODEL_NAME) -> Decision:
    """`decide` between `version` (its weights in `weights_dir`) and the `champion` ModelVersion, paired on
    the val pieces of `data_dir`."""
    champion_dir = resolve_model_uri(f"models:/{name}/{champion.version}", mlflow_client.tracking_uri)
    comparison = compare(weights_dir, champion_dir, data_dir)
    return decide(version, comparison.challenger_val_bpb, champion.version, comparison, min_improvement)


def champion_challenger(mlflow_client, version: str, weights_dir: str | Path, val_bpb: float,
                        data_dir: str | Path, policy: str = "if-better", min_improvement: float = 0.0,
                        name: str = MODEL_NAME) -> Decision:
    """The gate after each registration. policy `if-better`: promote `version` (its weights in
    `weights_dir`, its `val_bpb` on `data_dir`) only if there is no production version yet or it beats
    production beyond noise (`against_champion`); `always` / `never` skip the comparison. The decision is
    recorded on the version either way."""
    if policy not in POLICIES:
        raise UserError(f"promotion policy {policy!r} is unknown; use one of: {', '.join(POLICIES)}")
    champion = version_by_alias(mlflow_client, PRODUCTION, name)
    if policy == "never":
        decision = Decision(False, "promotion policy 'never'", version, val_bpb)
    elif policy == "always":
        decision = Decision(True, "promotion policy 'always'", version, val_bpb)
    elif champion is None:
        decision = decide(version, val_bpb)
    else:
        decision = against_champion(mlflow_client, version, weights_dir, data_dir, champion, min_improvement, name)
    record_decision(mlflow_client, decision, name)
    if decision.promote:
        promote(mlflow_client, version, PRODUCTION, name, reason=decision.reason)
    return decision
