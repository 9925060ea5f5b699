"""Retrieval in the server: the served version's index as an OpenAI vector store, and the `retrieval` field.

    GET  /v1/vector_stores                      the served version's index, as one vector store
    POST /v1/vector_stores/{id}/search          {query, max_num_results}: scored passages, OpenAI's page shape

A completion or chat request reads the best passages of the training text before its prompt with
`"retrieval": {"k": 2}` (or `true`: k = 1, or the server's --retrieval K), and `"retrieval": false` turns off a
server's default. The response's choices carry `citations`: passage id, document, offset, source, score. We
chose a field of our own over OpenAI's `file_search` tool: that tool belongs to the Responses and Assistants
APIs, where the model decides to call it; a base model calls no tools, and Chat Completions has no such tool.

The store's id is `vs_` and the first 12 hex digits of the index's sha256, so it changes when a promotion brings
another index; the served model's stable id (e.g. `gptmini`) names the current store too.
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict

from gptmini.rag import RagOptions, retrieve
from gptmini.retrieval import MAX_K, Index, Passage
from gptmini.server.host import ModelHost, Served
from gptmini.server.metrics import Metrics
from gptmini.server.schema import ApiError


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


def request_k(value: Any, default_k: int) -> int:
    """Passages per prompt from a request's `retrieval` field: absent is the server's default, false is 0."""
    if value is None:
        return default_k
    if value is True or value is False:
        return int(value) and max(default_k, 1)
    if isinstance(value, dict):
        extra = set(value) - {"k", "stride"}
        if extra:
            raise ApiError(400, f"retrieval.{sorted(extra)[0][:40]} is not a retrieval option; use k", param="retrieval",
                           code="invalid_value")
        if value.get("stride") is not None:
            raise ApiError(400, "retrieval.stride is not supported by gptmini serve: it retrieves once, before the "
                                "first token (`gptmini generate --rag --rag-stride N` retrieves again); leave it out",
                           param="retrieval.stride", code="invalid_value")
        k = value.get("k", max(default_k, 1))
        if type(k) is not int or not 1 <= k <= MAX_K:
            raise ApiError(400, f"retrieval.k={k!r:.20} is out of range; use 1 to {MAX_K}", param="retrieval.k",
                           code="invalid_value")
        return k
    raise ApiError(400, f"retrieval must be true, false or {{\"k\": N}}; got {value!r:.40}", param="retrieval",
                   code="invalid_value")


def with_passages(served: Served, prompt: list[int], budget: int, k: int, metrics: Metrics,
                  endpoint: str) -> tuple[list[int], list[dict]]:
    """The prompt after its k best passages, within `budget` tokens (the context less max_tokens), and the
    citations; `rag.retrieve`, as `gptmini generate --rag` does."""
    started = time.perf_counter()
    context, found = retrieve(served.index, served.engine.tokenizer, prompt, budget, RagOptions(k=k))
    metrics.retrieval.labels(endpoint).observe(time.perf_counter() - started)
    return context, [citation(p) for p in found]


def check_available(served: Served, value: Any, k: int) -> int:
    """0 when retrieval is off; a request that asks for it from a version without an index is told so."""
    if k and served.index is None:
        if value is not None:
            raise ApiError(400, f"{served.label} has no retrieval index: it serves without retrieval; leave out "
                                "`retrieval`", param="retrieval", code="retrieval_unavailable")
        return 0  # the server's default, for a version that has none
    return k
