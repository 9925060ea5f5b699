"""Which engine answers new requests: a checkpoint's, or the version a registry alias points at.

Following the registry: with `--model models:/NAME@ALIAS` a thread polls the alias every `poll_interval`
seconds. When it moves, the new version loads in the background while the old one keeps answering; then new
requests go to the new engine and the old one finishes what it holds (its running and queued requests) and
stops. A version that fails to load leaves the old one serving (one log line, `gptmini_model_load_failures_total`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gptmini import quantize, registry
from gptmini.weights import load_model
from gptmini.engine import Engine, Sampling, generate_one
from gptmini.errors import Failure, UserError
from gptmini.retrieval import Index
from gptmini.server.config import ServeConfig
from gptmini.server.metrics import Metrics
from gptmini.server.schema import ApiError

log = logging.getLogger("gptmini.serve")


@dataclass
class Served:
    engine: Engine
    label: str  # what responses name as `model`: NAME/VERSION for a registry version
    version: str | None
    stable: str  # the id that outlives promotions: the registered name (or --served-name)
    aliases: set[str] = field(default_factory=set)  # the other ids a request may name it by
    index: Index | None = None  # the retrieval index of its training data; None: it serves without retrieval
    created: int = field(default_factory=lambda: int(time.time()))

    def listed(self) -> list[str]:
        """GET /v1/models' ids: the stable one first, since clients and chat UIs commonly take the first and
        keep it, then the version that answers now."""
        rest = sorted(a for a in self.aliases - {self.stable, self.label} if not a.startswith("models:/"))
        return list(dict.fromkeys([self.stable, self.label])) + rest


def open_index(path: Path | None) -> Index | None:
    """A prepared folder's index or an index file; None for none."""
    if path is None:
        return None
    return Index.of(path) if Path(path).is_dir() else Index(path)


class ModelHost:
    """Which engine answers new requests: the checkpoint, or the version the registry alias points at."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.current: Served | None = None
        self.retired: list[Engine] = []  # swapped out, finishing what they hold
        self.lock = threading.Lock()
        self.failed: dict[str, float] = {}
        self.unready = "the model is loading"
        self.stop = threading.Event()
        self.metrics = Metrics(self.queue_depth, self.occupancy, config.max_batch)
        self.thread: threading.Thread | None = None
        self._last_poll_error = ""
        if config.model_uri:
            self.name, self.alias, _ = registry.parse_model_uri(config.model_uri)
            self.unready = f"looking up {config.model_uri} in the registry"

    def queue_depth(self) -> int:
        return sum(e.queue_depth for e in self.engines())

    def occupancy(self) -> int:
        return sum(e.occupancy for e in self.engines())

    def engines(self) -> list[Engine]:
        with self.lock:
            self.retired = [e for e in self.retired if not e.closed]
            return ([self.current.engine] if self.current else []) + self.retired

    def start(self) -> None:
        """Load a checkpoint now (a bad path fails the command); follow a registry URI in the background."""
        if self.config.checkpoint is not None:
            self._swap(self._load(self.config.checkpoint, self.config.served_name, None, self.config.index))
            return
        self.thread = threading.Thread(target=self._follow, name="registry-follower", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        for engine in self.engines():
            engine.close()

    def _load(self, path: Path, label: str, version: str | None, index: Path | None = None) -> Served:
        index = open_index(index)  # first: a missing index fails the version before its weights load
        model, tokenizer = load_model(path, device=self.config.device)
        model = quantize.apply(model, self.config.quantize)
        engine = Engine(model, tokenizer, self.config.max_batch, self.config.max_queue, name=label,
                        prefill_chunk=self.config.prefill_chunk)
        try:  # the first forward pays one-off costs (allocator, kernels): before any client does
            generate_one(engine, [tokenizer.eot_token], Sampling(max_tokens=2, temperature=0))
        except BaseException:
            engine.close()
            raise
        if index is None:
            log.info("%s has no retrieval index: it serves without retrieval", label)
        if version is None:
            return Served(engine, label, None, self.config.served_name, {label, self.config.served_name}, index=index)
        aliases = {label, self.name, f"{self.name}@{self.alias}" if self.alias else label, self.config.model_uri}
        return Served(engine, label, version, self.name, aliases, index=index)

    def _swap(self, new: Served) -> None:
        with self.lock:
            old, self.current = self.current, new
            if old is not None:
                self.retired.append(old.engine)
        self.metrics.served.clear()
        self.metrics.served.labels(new.label, new.version or "", self.config.quantize).set(1)
        if old is not None:
            self.metrics.swaps.inc()
            old.engine.close()  # it finishes its running and queued requests, then its thread ends
            log.info("now serving %s (was %s); requests already running finish on %s",
                     new.label, old.label, old.label)
        else:
            log.info("serving %s", new.label)

    def _follow(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.config.poll_interval)

    def poll(self) -> None:
        """One look at the alias; loads and swaps in the version it points to if that is new."""
        uri = self.config.model_uri
        try:
            version = registry.current_version(uri)
        except (UserError, Failure) as exc:
            if str(exc) != self._last_poll_error:
                log.warning("cannot read %s: %s", uri, exc)
            self._last_poll_error = str(exc)
            if self.current is None:
                self.unready = f"cannot read {uri}: {exc}"
            return
        self._last_poll_error = ""
        if version is None:
            self.unready = (f"no version of {self.name!r} has the alias {self.alias!r} yet; run `make demo`, or "
                            f"register one and `gptmini promote VERSION`")
            return
        if self.current is not None and self.current.version == version:
            return
        if time.monotonic() - self.failed.get(version, -1e9) < self.config.retry_failed_after:
            return
        label = f"{self.name}/{version}"
        try:
            # The weights and the index of one version, loaded together and swapped in together.
            _, weights, index = registry.resolve_with_index(f"models:/{label}")
            served = self._load(weights, label, version, index)
        except Exception as exc:  # whatever is wrong with the new version, the old one keeps serving
            self.failed[version] = time.monotonic()
            self.metrics.load_failures.labels(version).inc()
            still = f"still serving {self.current.label}" if self.current else "nothing is served yet"
            log.error("%s (%s) failed to load: %s: %s; %s", label, uri, type(exc).__name__,
                      str(exc).splitlines()[0][:300] if str(exc) else "", still)
            if self.current is None:
                self.unready = f"{label} failed to load ({type(exc).__name__}); waiting for another version"
            return
        self.failed.pop(version, None)
        self._swap(served)

    def require(self, model: str | None) -> Served:
        served = self.current
        if served is None:
            raise ApiError(503, f"no model is loaded: {self.unready}", "service_unavailable", code="model_not_ready")
        if model and model not in served.aliases:
            # A version pinned by a client is not kept once the alias moves on: one clear 404 that names the id
            # to use instead, rather than an answer from a model the client did not ask for.
            follows = f", which follows {self.config.model_uri} (now {served.label!r})" if served.version else ""
            raise ApiError(404, f"the model {model!r} is not served here; name {served.stable!r}{follows} (see GET "
                                "/v1/models)", param="model", code="model_not_found")
        return served

