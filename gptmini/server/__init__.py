"""`gptmini serve`: an OpenAI-compatible HTTP API (FastAPI on uvicorn) over continuous-batching engines, that
follows a registry alias.

    POST /v1/completions        prompt: a string or a list of strings
    POST /v1/chat/completions   messages, rendered by CHAT_TEMPLATE (this is a base model, not a chat model)
    GET  /v1/models             the served model: its stable id first, then its version
    GET  /health                the process is alive          GET /ready   a model is loaded (503 until then)
    GET  /metrics               Prometheus: requests, tokens, latencies, queue depth, batch occupancy, version

The parts, each importing only those below it:

    app         the routes and the process (`serve`)
    responses   a generation as one JSON body or as server-sent events
    bridge      one request's sequences on the engine thread, their text as events on the event loop
    limits      the ASGI body limit
    host        the served engine and the registry follower that swaps it (`ModelHost`)
    schema      the OpenAI request schema and its errors; metrics: the Prometheus metrics
    config      `ServeConfig`

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and the message names the field
and the limit. Nothing in a request can make the server load anything: `model` must name what is served.
"""
from gptmini.server.app import create_app, serve
from gptmini.server.config import ServeConfig
from gptmini.server.host import ModelHost

__all__ = ["ModelHost", "ServeConfig", "create_app", "serve"]
