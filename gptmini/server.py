"""`gptmini serve`: an OpenAI-compatible HTTP API (FastAPI on uvicorn) over continuous-batching engines, that
follows a registry alias.

    POST /v1/completions        prompt: a string or a list of strings
    POST /v1/chat/completions   messages, rendered by CHAT_TEMPLATE (this is a base model, not a chat model)
    GET  /v1/models             the served version
    GET  /health                the process is alive          GET /ready   a model is loaded (503 until then)
    GET  /metrics               Prometheus: requests, tokens, latencies, queue depth, batch occupancy, version

Following the registry: with `--model models:/NAME@ALIAS` a thread polls the alias every `poll_interval`
seconds. When it moves, the new version loads in the background while the old one keeps answering; then new
requests go to the new engine and the old one finishes what it holds (its running and queued requests) and
stops. A version that fails to load leaves the old one serving (one log line, `gptmini_model_load_failures_total`).

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and the message names the field
and the limit. Nothing in a request can make the server load anything: `model` must name what is served.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gptmini import quantize, registry
from gptmini.checkpoint import load_model
from gptmini.engine import Engine, EngineClosed, QueueFull, Sampling, Sequence, generate_one, prompt_ids
from gptmini.errors import Failure, UserError

log = logging.getLogger("gptmini.serve")

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI allows
CHAT_STOP = "\nUser:"
CHAT_TEMPLATE = """A system (or developer) message opens the text; each turn is one line; the model continues
after the final "Assistant:", and stops where it would start the user's next turn ("\\nUser:"):

    {system}

    User: {user message}
    Assistant: {assistant message}
    User: {user message}
    Assistant:"""


@dataclass
class ServeConfig:
    checkpoint: Path | None = None
    model_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_name: str = "gptmini"  # the model id of a --checkpoint
    max_batch: int = 16
    max_queue: int = 64
    max_tokens: int = 512  # the cap on a request's max_tokens
    poll_interval: float = 10.0
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    device: str = "cpu"
    quantize: str = "none"
    retry_failed_after: float = 60.0  # a version that failed to load is tried again after this long


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# Requests: OpenAI's fields, strictly typed; the extensions are top_k and ignore_eos (vLLM's names).

IGNORED = {"user", "metadata", "store", "service_tier", "stream_options"}
# Fields we do not implement, accepted only at the value that means "off".
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (None, False),
           "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1), "logit_bias": (None, {}),
           "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
           "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None, False, True)}


def param_error(param: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", "{message}", {"message": message, "param": param})


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Any = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise param_error("stop", f"stop must be a non-empty string or a list of them (got {v!r})")
        if len(stops) > MAX_STOP:
            raise param_error("stop", f"stop has {len(stops)} strings; at most {MAX_STOP} are allowed")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> GenerationRequest:
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED:
                continue
            if key not in NEUTRAL:
                raise param_error(key, f"unrecognized request argument {key!r}")
            if value not in NEUTRAL[key]:
                raise param_error(key, f"{key}={value!r} is not supported by gptmini serve; leave it out")
        return self


class CompletionRequest(GenerationRequest):
    prompt: Any = Field(...)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise param_error("prompt", "prompt must be a string or a non-empty list of strings "
                                        f"(token-id prompts are not supported); got {_short(v)}")
        return prompts


class ChatRequest(GenerationRequest):
    messages: Any = Field(...)
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v: Any) -> list[tuple[str, str]]:
        if not isinstance(v, list) or not v:
            raise param_error("messages", f"messages must be a non-empty list of {{role, content}}; got {_short(v)}")
        out = []
        for i, m in enumerate(v):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ("system", "developer", "user", "assistant"):
                raise param_error(f"messages[{i}].role",
                                  f"messages[{i}].role must be system, developer, user or assistant; got {role!r}")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise param_error(f"messages[{i}].content", f"messages[{i}].content parts must be "
                                      "{\"type\": \"text\", \"text\": ...}; this model reads text only")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise param_error(f"messages[{i}].content", f"messages[{i}].content must be a string; got {_short(content)}")
            out.append((role, content))
        return out


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The text a chat becomes (CHAT_TEMPLATE)."""
    parts = []
    for role, content in messages:
        if role in ("system", "developer"):
            parts.append(f"{content}\n\n")
        else:
            parts.append(f"{'User' if role == 'user' else 'Assistant'}: {content}\n")
    return "".join(parts) + "Assistant:"


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem, as one message that names the field (FastAPI's default is a 422 list)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({detail}); send a JSON object", code="invalid_json")
    ctx = err.get("ctx") or {}
    param = ctx.get("param") or (loc[0] if loc else None)
    if err.get("type") == "missing":
        return ApiError(400, f"missing required field {param!r}", param=param, code="missing_field")
    if err.get("type") in ("model_type", "model_attributes_type") and not loc:
        return ApiError(400, "the request body must be a JSON object", code="invalid_type")
    message = ctx.get("message") or err.get("msg", "invalid value")
    if "message" not in ctx:
        message = f"{'.'.join(loc)}: {message} (got {_short(err.get('input'))})"
    return ApiError(400, message, param=param, code="invalid_value")


# Metrics

class Metrics:
    def __init__(self, host: ModelHost):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gptmini_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gptmini_prompt_tokens", "prompt tokens read", registry=r)
        self.completion_tokens = Counter("gptmini_completion_tokens", "tokens generated", registry=r)
        self.latency = Histogram("gptmini_request_latency_seconds", "request latency, to the last token",
                                 ["endpoint"], registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("gptmini_time_to_first_token_seconds", "request start to its first token",
                              registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.itl = Histogram("gptmini_inter_token_latency_seconds", "time between two tokens of one request",
                             registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        Gauge("gptmini_queue_depth", "requests waiting for a batch slot", registry=r).set_function(host.queue_depth)
        Gauge("gptmini_batch_occupancy", "sequences in the running batch", registry=r).set_function(host.occupancy)
        Gauge("gptmini_batch_slots", "batch slots (--max-batch)", registry=r).set_function(lambda: host.config.max_batch)
        self.served = Gauge("gptmini_served_model_info", "1 for the model version answering new requests",
                            ["model", "version", "quantize"], registry=r)
        self.swaps = Counter("gptmini_model_swaps", "times a new model version took over", registry=r)
        self.load_failures = Counter("gptmini_model_load_failures", "model versions that failed to load",
                                     ["version"], registry=r)


# The served model and the registry follower

@dataclass
class Served:
    engine: Engine
    label: str  # what responses name as `model`: NAME/VERSION for a registry version
    version: str | None
    aliases: set[str] = field(default_factory=set)  # the other ids a request may name it by
    created: int = field(default_factory=lambda: int(time.time()))


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
        self.metrics = Metrics(self)
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
            self._swap(self._load(self.config.checkpoint, self.config.served_name, None))
            return
        self.thread = threading.Thread(target=self._follow, name="registry-follower", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        for engine in self.engines():
            engine.close()

    def _load(self, path: Path, label: str, version: str | None) -> Served:
        model, tokenizer = load_model(path, device=self.config.device)
        model = quantize.apply(model, self.config.quantize)
        engine = Engine(model, tokenizer, self.config.max_batch, self.config.max_queue, name=label)
        try:  # the first forward pays one-off costs (allocator, kernels): before any client does
            generate_one(engine, [tokenizer.eot_token], Sampling(max_tokens=2, temperature=0))
        except BaseException:
            engine.close()
            raise
        aliases = {label, self.config.served_name} if version is None else {
            label, self.name, f"{self.name}@{self.alias}" if self.alias else label, self.config.model_uri}
        return Served(engine, label, version, aliases)

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
            served = self._load(registry.resolve_model_uri(f"models:/{label}"), label, version)
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
            raise ApiError(404, f"the model {model!r} is not served here; this server serves {served.label!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")
        return served


# Generation through the engine, as events on the event loop

@dataclass
class Choice:
    seq: Sequence
    index: int
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    last_event: float | None = None


class Generation:
    """The sequences of one request (prompts x n) and the events they send back to the event loop."""

    def __init__(self, host: ModelHost, body: GenerationRequest, prompts: list[str], endpoint: str,
                 extra_stop: tuple[str, ...] = ()):
        self.host, self.endpoint, self.started = host, endpoint, time.perf_counter()
        self.served = host.require(body.model)
        tok = self.served.engine.tokenizer
        context = self.served.engine.max_seq_len
        ids = [prompt_ids(tok, p) for p in prompts]
        cap = self.host.config.max_tokens
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > cap:
            raise ApiError(400, f"max_tokens={asked} is above this server's cap of {cap} (--max-tokens)",
                           param="max_tokens", code="invalid_value")
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.choices: list[Choice] = []
        self.prompt_tokens = 0
        self.last_event: float | None = None
        for p, prompt in enumerate(ids):
            room = context - len(prompt)
            max_tokens = asked if asked is not None else (16 if endpoint == "completions" else min(cap, room))
            if len(prompt) + max_tokens > context:
                raise ApiError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = "
                                    f"{len(prompt) + max_tokens} exceeds the model's context of {context} tokens; "
                                    "shorten the prompt or lower max_tokens",
                               param="max_tokens" if room > 0 else ("prompt" if endpoint == "completions" else "messages"),
                               code="context_length_exceeded")
            self.prompt_tokens += len(prompt) * body.n
            for i in range(body.n):
                sampling = Sampling(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                    top_p=body.top_p if body.top_p < 1.0 else None,
                                    seed=None if body.seed is None else body.seed + i,
                                    stop=tuple(body.stop) + extra_stop, ignore_eos=body.ignore_eos)
                index = len(self.choices)
                self.choices.append(Choice(Sequence(prompt, sampling, self._emitter(index)), index))
        self.pending = len(self.choices)

    def _emitter(self, index: int) -> Callable[[str, str | None], None]:
        def emit(delta: str, reason: str | None) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, delta, reason, time.perf_counter()))
        return emit

    def submit(self) -> None:
        seqs = [c.seq for c in self.choices]
        for _ in range(3):  # a swap can close the engine between require() and here: take the new one
            try:
                self.served.engine.submit(seqs)
                return
            except EngineClosed:
                self.served = self.host.require(None)
            except QueueFull as exc:
                raise ApiError(429, f"the server is at capacity: {exc}; retry shortly", "rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"}) from None
        raise ApiError(503, "the model was swapped several times in a row; retry", "service_unavailable")

    async def next_event(self, timeout: float | None = None) -> tuple[Choice, str, str | None]:
        """The next (choice, text delta, finish_reason); asyncio.TimeoutError after `timeout` seconds."""
        index, delta, reason, at = await asyncio.wait_for(self.events.get(), timeout)
        choice, m = self.choices[index], self.host.metrics
        if self.last_event is None:
            m.ttft.observe(at - self.started)
        if choice.last_event is not None:
            m.itl.observe(at - choice.last_event)
        self.last_event = choice.last_event = at
        if reason:
            choice.finish_reason = reason
            self.pending -= 1
        return choice, delta, reason

    def cancel(self) -> None:
        for c in self.choices:
            if c.finish_reason is None:
                c.seq.cancel()
        self.served.engine.wake()

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.seq.tokens) for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def account(self, status: int) -> None:
        m = self.host.metrics
        m.requests.labels(self.endpoint, str(status)).inc()
        m.prompt_tokens.inc(self.prompt_tokens)
        m.completion_tokens.inc(self.completion_tokens)
        m.latency.labels(self.endpoint).observe(time.perf_counter() - self.started)


def create_app(host: ModelHost) -> FastAPI:
    config = host.config
    app = FastAPI(title="gptmini", summary="OpenAI-compatible completions from a gptmini model",
                  version="1", docs_url="/docs", redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            host.metrics.requests.labels(request.url.path.rsplit("/", 1)[-1], str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return await _api_error(request, ApiError(500, f"internal error: {type(exc).__name__}; see the server log",
                                                  "server_error"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, validation_error(exc))

    def authorized(request: Request) -> None:
        if not config.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send it as `Authorization: Bearer KEY` "
                                "(the key the server was started with: --api-key or GPTMINI_API_KEY)",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        served = host.current
        if served is None:
            return JSONResponse({"ready": False, "reason": host.unready}, status_code=503)
        return JSONResponse({"ready": True, "model": served.label})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(host.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        served = host.require(None)
        ids = [served.label] + sorted(a for a in served.aliases - {served.label} if not a.startswith("models:/"))
        return {"object": "list", "data": [{"id": i, "object": "model", "created": served.created,
                                            "owned_by": "gptmini", "root": served.label} for i in ids]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        gen = Generation(host, body, body.prompt, "completions")
        return await respond(gen, body, request, completion_chunk, completion_body)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        gen = Generation(host, body, [chat_prompt(body.messages)], "chat", extra_stop=(CHAT_STOP,))
        return await respond(gen, body, request, chat_chunk, chat_body)

    return BodyLimit(app, config.max_body_bytes)


def completion_chunk(rid: str, gen: Generation, choice: Choice, delta: str, reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": gen.served.label,
            "choices": [{"index": choice.index, "text": delta, "finish_reason": reason, "logprobs": None}]}


def completion_body(rid: str, gen: Generation) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": gen.served.label,
            "choices": [{"index": c.index, "text": "".join(c.text), "finish_reason": c.finish_reason,
                         "logprobs": None} for c in gen.choices], "usage": gen.usage()}


def chat_chunk(rid: str, gen: Generation, choice: Choice, delta: str, reason: str | None) -> dict:
    # The stream opens with the role alone, as OpenAI's does; every later chunk carries content only.
    message = {"content": delta} if choice.text or reason else {"role": "assistant", "content": ""}
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": gen.served.label,
            "choices": [{"index": choice.index, "delta": message, "finish_reason": reason, "logprobs": None}]}


def chat_body(rid: str, gen: Generation) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": gen.served.label,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                         "finish_reason": c.finish_reason, "logprobs": None} for c in gen.choices],
            "usage": gen.usage()}


def _chat_text(gen: Generation, choice: Choice, delta: str) -> str:
    """The template ends at "Assistant:"; the model's first token usually starts with a space, which the
    message's content leaves out."""
    return delta.lstrip() if gen.endpoint == "chat" and not "".join(choice.text) else delta


async def respond(gen: Generation, body: GenerationRequest, request: Request, chunk, whole) -> Response:
    rid = f"{'chatcmpl' if gen.endpoint == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
    gen.submit()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream(gen, rid, chunk, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    while gen.pending:
        try:
            choice, delta, reason = await gen.next_event(timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():  # the client hung up: free its slots now
                gen.cancel()
                gen.account(499)
                return Response(status_code=499)
            continue
        if reason == "error":
            gen.cancel()
            raise ApiError(500, delta, "server_error")
        choice.text.append(_chat_text(gen, choice, delta))
    gen.account(200)
    return JSONResponse(whole(rid, gen))


async def stream(gen: Generation, rid: str, chunk, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A client that disconnects
    cancels this generator (Starlette), and the finally clause frees its sequences' slots."""
    done = False
    try:
        if gen.endpoint == "chat":  # the role first, as OpenAI sends it
            for c in gen.choices:
                yield sse(chunk(rid, gen, c, "", None))
        while gen.pending:
            choice, delta, reason = await gen.next_event()
            if reason == "error":
                yield sse({"error": {"message": delta, "type": "server_error", "param": None, "code": None}})
                gen.account(500)
                return
            delta = _chat_text(gen, choice, delta)
            choice.text.append(delta)
            if delta or reason:
                yield sse(chunk(rid, gen, choice, delta, reason))
        if include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk" if gen.endpoint == "chat" else "text_completion",
                       "created": int(time.time()), "model": gen.served.label, "choices": [], "usage": gen.usage()})
        yield "data: [DONE]\n\n"
        done = True
        gen.account(200)
    finally:
        if not done:
            gen.cancel()
            gen.account(499)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413 before the app reads it (ASGI middleware)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or {}).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send) -> None:
        error = ApiError(413, f"the request body is over this server's limit of {self.limit} bytes; send a "
                              "shorter prompt", code="request_too_large")
        await error.response()(scope, receive, send)


class BodyTooLarge(Exception):
    pass


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear error rather than uvicorn's log."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Failure(f"cannot listen on {host}:{port}: {exc.strerror}; is another server there? pick "
                      "another --port") from None
    return sock


def serve(config: ServeConfig) -> None:
    """Load (or start following) the model, then answer HTTP until SIGINT/SIGTERM."""
    host = ModelHost(config)
    host.start()
    try:
        sock = listen(config.host, config.port)
    except BaseException:
        host.close()
        raise
    app = create_app(host)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10, access_log=True))
    where = f"http://{config.host}:{config.port}"
    log.info("listening on %s (OpenAI API under %s/v1; metrics at %s/metrics)", where, where, where)
    try:
        server.run(sockets=[sock])
    finally:
        host.close()
