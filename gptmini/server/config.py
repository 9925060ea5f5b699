"""The settings of one `gptmini serve` process."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServeConfig:
    checkpoint: Path | None = None
    model_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_name: str = "gptmini"  # the model id of a --checkpoint
    max_batch: int = 16
    prefill_chunk: int = 96  # prompt tokens prefilled per decode step; 0 = each prompt whole
    max_queue: int = 64
    max_tokens: int = 512  # the cap on a request's max_tokens
    poll_interval: float = 10.0
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    device: str = "cpu"
    quantize: str = "none"
    index: Path | None = None  # a --checkpoint's retrieval index (a prepared folder or an index file)
    retrieval_k: int = 0  # passages read before every prompt unless a request says otherwise; 0: only on request
    retry_failed_after: float = 60.0  # a version that failed to load is tried again after this long

