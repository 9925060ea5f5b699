"""The routes, and the process that serves them (uvicorn on a socket bound here)."""
from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import Callable

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gptmini.errors import Failure
from gptmini.server.bridge import Generation
from gptmini.server.config import ServeConfig
from gptmini.server.host import ModelHost
from gptmini.server.limits import BodyLimit
from gptmini.server.responses import chat_body, chat_chunk, completion_body, completion_chunk, respond
from gptmini.server.schema import CHAT_STOP, ApiError, ChatRequest, CompletionRequest, chat_prompt, validation_error

log = logging.getLogger("gptmini.serve")


ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/models": "models"}


def create_app(host: ModelHost) -> FastAPI:
    app = FastAPI(title="gptmini", summary="OpenAI-compatible completions from a gptmini model",
                  version="1", docs_url="/docs", redoc_url=None)
    add_error_handlers(app, host)
    authorized = [Depends(bearer_token(host.config.api_key))]

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

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict:
        served = host.require(None)
        ids = [served.label] + sorted(a for a in served.aliases - {served.label} if not a.startswith("models:/"))
        return {"object": "list", "data": [{"id": i, "object": "model", "created": served.created,
                                            "owned_by": "gptmini", "root": served.label} for i in ids]}

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        gen = Generation(host, body, body.prompt, "completions")
        return await respond(gen, body, request, completion_chunk, completion_body)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        gen = Generation(host, body, [chat_prompt(body.messages)], "chat", extra_stop=(CHAT_STOP,))
        return await respond(gen, body, request, chat_chunk, chat_body)

    return BodyLimit(app, host.config.max_body_bytes)


def add_error_handlers(app: FastAPI, host: ModelHost) -> None:
    """Every error leaves in OpenAI's shape, and is counted under its endpoint."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if request.url.path in ENDPOINTS:
            host.metrics.requests.labels(ENDPOINTS[request.url.path], str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return await api_error(request, ApiError(500, f"internal error: {type(exc).__name__}; see the server log",
                                                 "server_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(exc))


def bearer_token(api_key: str | None) -> Callable[[Request], None]:
    def authorized(request: Request) -> None:
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send it as `Authorization: Bearer KEY` "
                                "(the key the server was started with: --api-key or GPTMINI_API_KEY)",
                           code="invalid_api_key")
    return authorized


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
