"""Retrieval in the server: the served version's index as an OpenAI vector store, and the `retrieval` field.

    GET  /v1/vector_stores                      the served version's index, as one vector store
    POST /v1/vector_stores/{id}/search          {query, max_num_results}: scored passages, OpenAI's page shape

A completion or chat request reads the best passages of the training text before its prompt with
`"retrieval": {"k": 2}` (or `true`: k = 1, or the server's --retrieval K), and `"retrieval": false` turns off a
server's default. `"retrieval": {"k": 1, "stride": 16}` retrieves again every 16 new tokens, with `rag.generate`,
the loop of `gptmini generate --rag`. The response's choices carry `citations`: passage id, document, offset, source, score. We
chose a field of our own over OpenAI's `file_search` tool: that tool belongs to the Responses and Assistants
APIs, where the model decides to call it; a base model calls no tools, and Chat Completions has no such tool.

The store's id is `vs_` and the first 12 hex digits of the index's sha256, so it changes when a promotion brings
another index; the served model's stable id (e.g. `gptmini`) names the current store too.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict

from gptmini.engine import Emit, Engine, QueueFull, Sampling, Sequence, TextStream
from gptmini.rag import MAX_STRIDE, RagOptions, generate, retrieve
from gptmini.retrieval import MAX_K, Index, Passage
from gptmini.server.host import ModelHost, Served
from gptmini.server.metrics import Metrics
from gptmini.server.schema import ApiError

log = logging.getLogger("gptmini.server")


def store_id(index: Index) -> str:
    return f"vs_{index.sha256[:12]}"


def served_index(host: ModelHost, vector_store_id: str) -> tuple[Served, Index]:
    served = host.require(None)
    if served.index is None:
        raise ApiError(404, f"{served.label} has no retrieval index: it serves without retrieval, so there is no "
                            "vector store", param="vector_store_id", code="vector_store_not_found")
    if vector_store_id not in (store_id(served.index), served.stable):
        raise ApiError(404, f"no vector store {vector_store_id[:80]!r}; this server holds "
                            f"{store_id(served.index)!r}, the index of {served.label} (see GET /v1/vector_stores)",
                       param="vector_store_id", code="vector_store_not_found")
    return served, served.index


class SearchRequest(BaseModel):
    """OpenAI's vector-store search; of its options, `rewrite_query` only at false and no `filters`."""

    model_config = ConfigDict(extra="forbid")
    query: Any
    max_num_results: Any = 10
    rewrite_query: bool = False
    filters: None = None
    ranking_options: dict | None = None


def check_search(body: SearchRequest) -> tuple[list[str], int]:
    queries = [body.query] if isinstance(body.query, str) else body.query
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) and q.strip() for q in queries):
        raise ApiError(400, f"query must be a non-empty string or a non-empty list of them; got {body.query!r:.60}",
                       param="query", code="invalid_value")
    k = body.max_num_results
    if type(k) is not int or not 1 <= k <= MAX_K:
        raise ApiError(400, f"max_num_results={k!r:.20} is out of range; use 1 to {MAX_K}", param="max_num_results",
                       code="invalid_value")
    if body.rewrite_query:
        raise ApiError(400, "rewrite_query=true is not supported by gptmini serve; leave it out",
                       param="rewrite_query", code="invalid_value")
    return queries, k


def search_result(p: Passage) -> dict:
    return {"file_id": p.id, "filename": p.document, "score": p.score,
            "attributes": {"document": p.document, "offset": p.offset, "source": p.source},
            "content": [{"type": "text", "text": p.text}]}


def citation(p: Passage) -> dict:
    return {"id": p.id, "document": p.document, "offset": p.offset, "source": p.source, "score": p.score}


def add_routes(app: FastAPI, host: ModelHost, authorized: list[Depends]) -> None:
    @app.get("/v1/vector_stores", dependencies=authorized)
    async def vector_stores() -> dict:
        served = host.require(None)
        stores = [] if served.index is None else [{
            "id": store_id(served.index), "object": "vector_store", "created_at": served.created,
            "name": f"{served.label} training text", "status": "completed", "usage_bytes": served.index.bytes,
            "file_counts": {"in_progress": 0, "completed": served.index.passages, "failed": 0, "cancelled": 0,
                            "total": served.index.passages},
            "metadata": {"sha256": served.index.sha256, "model": served.label}}]
        return {"object": "list", "data": stores, "first_id": stores[0]["id"] if stores else None,
                "last_id": stores[0]["id"] if stores else None, "has_more": False}

    @app.post("/v1/vector_stores/{vector_store_id}/search", dependencies=authorized)
    def search(vector_store_id: str, body: SearchRequest) -> dict:  # a plain def: SQLite runs on a worker thread
        queries, k = check_search(body)
        _, index = served_index(host, vector_store_id)
        started = time.perf_counter()
        found = index.search(" ".join(queries), k)
        host.metrics.retrieval.labels("vector_store_search").observe(time.perf_counter() - started)
        return {"object": "vector_store.search_results.page", "search_query": queries,
                "data": [search_result(p) for p in found], "has_more": False, "next_page": None}


def request_options(value: Any, default_k: int) -> RagOptions | None:
    """A request's `retrieval` field: absent is the server's default (--retrieval K), false is off (None)."""
    if value is None or value is True or value is False:
        k = default_k if value is None else int(value) and max(default_k, 1)
        return RagOptions(k=k) if k else None
    if isinstance(value, dict):
        extra = set(value) - {"k", "stride"}
        if extra:
            raise ApiError(400, f"retrieval.{sorted(extra)[0][:40]} is not a retrieval option; use k and stride",
                           param="retrieval", code="invalid_value")
        k, stride = value.get("k", max(default_k, 1)), value.get("stride")
        if type(k) is not int or not 1 <= k <= MAX_K:
            raise ApiError(400, f"retrieval.k={k!r:.20} is out of range; use 1 to {MAX_K}", param="retrieval.k",
                           code="invalid_value")
        if stride is not None and (type(stride) is not int or not 1 <= stride <= MAX_STRIDE):
            raise ApiError(400, f"retrieval.stride={stride!r:.20} is out of range; use 1 to {MAX_STRIDE}, or leave "
                                "it out to retrieve once", param="retrieval.stride", code="invalid_value")
        return RagOptions(k=k, stride=stride)
    raise ApiError(400, f"retrieval must be true, false or {{\"k\": N, \"stride\": S}}; got {value!r:.40}",
                   param="retrieval", code="invalid_value")


def with_passages(served: Served, prompt: list[int], budget: int, k: int, metrics: Metrics,
                  endpoint: str) -> tuple[list[int], list[dict]]:
    """The prompt after its k best passages, within `budget` tokens (the context less max_tokens), and the
    citations; `rag.retrieve`, as `gptmini generate --rag` does."""
    started = time.perf_counter()
    context, found = retrieve(served.index, served.engine.tokenizer, prompt, budget, RagOptions(k=k))
    metrics.retrieval.labels(endpoint).observe(time.perf_counter() - started)
    return context, [citation(p) for p in found]


class TimedIndex:
    """An index whose searches are observed in /metrics."""

    def __init__(self, index: Index, observe: Callable[[float], None]):
        self.index, self.observe = index, observe

    def search(self, *args) -> list[Passage]:
        started = time.perf_counter()
        found = self.index.search(*args)
        self.observe(time.perf_counter() - started)
        return found


class Strided:
    """One choice of a request with `retrieval.stride`: `rag.generate` (the loop `gptmini generate --rag`
    runs) on a thread of its own, each stride's tokens one Sequence on the engine, so it is batched with every
    other request. `seq` is the whole choice (its tokens, finish reason and cancellation); its text is cut by
    one TextStream across the strides, so a stop string or a character may span two of them."""

    def __init__(self, prompt: list[int], sampling: Sampling, opts: RagOptions, emit: Emit, metrics: Metrics,
                 endpoint: str):
        self.seq = Sequence(prompt, sampling)
        self.opts, self.emit, self.citations = opts, emit, []
        self.observe = metrics.retrieval.labels(endpoint).observe
        self.ended: tuple[str, str] | None = None  # (finish reason, last text) once a stop or an error is seen
        self.segment: Sequence | None = None
        self.segment_done = threading.Event()
        self.pushed = 0  # of the segment's tokens, those taken into the choice

    def start(self, served: Served) -> None:
        threading.Thread(target=self._run, args=(served,), name="retrieval-stride", daemon=True).start()

    def _run(self, served: Served) -> None:
        engine, s = served.engine, self.seq.sampling
        self.text, self.eot = TextStream(engine.tokenizer, s.stop), engine.tokenizer.eot_token
        self.generator = torch.Generator(device=engine.device)  # one stream of samples across the strides
        if s.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(s.seed)
        try:
            found = generate(TimedIndex(served.index, self.observe), engine.tokenizer, self.seq.prompt, s.max_tokens,
                             lambda context, n: self._complete(engine, context, n), engine.max_seq_len,
                             self.opts).citations
        except Exception as exc:  # a swap closed the engine, or a bug: this choice fails, the server goes on
            log.exception("a generation with retrieval.stride failed")
            found, self.ended = [], ("error", f"generation failed: {type(exc).__name__}: {exc}")
        self.citations.extend(citation(p) for p in found)  # before the last event, which sends them
        reason, delta = self.ended or ("length" if len(self.seq.tokens) >= s.max_tokens else "stop",
                                       self.text.flush())
        self.seq.finish_reason = reason
        self.emit(delta, reason)

    def _complete(self, engine: Engine, context: list[int], n: int) -> list[int]:
        if self.ended or self.seq.cancelled:
            return []  # fewer than n: `rag.generate` stops
        s = self.seq.sampling
        self.segment = Sequence(context, replace(s, max_tokens=n, stop=(), seed=None), self._segment_event)
        self.segment.generator, self.pushed = self.generator, 0
        self.segment_done.clear()
        while True:
            try:
                engine.submit([self.segment])
                break
            except QueueFull:
                if self.seq.cancelled:
                    return []
                time.sleep(0.05)
        # A sequence cancelled while it waits in the queue never reports: the client's leaving is seen here.
        while not self.segment_done.wait(0.5):
            if self.seq.cancelled:
                self.segment.cancel()
                return []
        return self.segment.tokens

    def _segment_event(self, delta: str, reason: str | None) -> None:
        """On the engine's thread: the segment's new tokens go into the choice's text."""
        seg = self.segment
        for token in seg.tokens[self.pushed:]:
            if self.ended:
                break
            self.seq.tokens.append(token)
            if token == self.eot and not self.seq.sampling.ignore_eos:
                self.ended = ("stop", self.text.flush())
                break
            text, stopped = self.text.push(token)
            if stopped:
                self.ended = ("stop", text)
            elif text:
                self.emit(text, None)
        self.pushed = len(seg.tokens)
        if reason == "error":
            self.ended = ("error", delta)
        if reason is None and (self.ended or self.seq.cancelled):
            seg.cancel()  # a cancelled sequence is dropped without a last event
            reason = "cancelled"
        if reason is not None:
            self.segment_done.set()


def check_available(served: Served, value: Any, opts: RagOptions | None) -> RagOptions | None:
    """None when retrieval is off; a request that asks for it from a version without an index is told so."""
    if opts and served.index is None:
        if value is not None:
            raise ApiError(400, f"{served.label} has no retrieval index: it serves without retrieval; leave out "
                                "`retrieval`", param="retrieval", code="retrieval_unavailable")
        return None  # the server's default, for a version that has none
    return opts
