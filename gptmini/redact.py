"""Credentials never reach logs, MLflow params or manifests: `redact()` masks them where URLs carry them.

A URL carries a secret in two places: its userinfo (`https://user:token@host/...`) and query parameters
named like one (`?token=...`, `&X-Amz-Signature=...`). Give credentials through the environment instead:
~/.netrc for downloads (requests reads it), MLFLOW_TRACKING_USERNAME/PASSWORD, PREFECT_API_AUTH_STRING.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@'\"]+@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][\w.-]*(?:token|key|secret|passw|pwd|signature|sig|credential|auth)[\w.-]*=)[^&#\s'\"]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with every URL userinfo and secret-named query value replaced by ***."""
    text = _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", text)
    return _SECRET_QUERY.sub(lambda m: m["key"] + MASK, text)


def redact_tree(value: Any) -> Any:
    """redact() applied to every string in nested dicts and lists (provenance records, params)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value
