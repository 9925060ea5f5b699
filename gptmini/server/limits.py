"""The body limit: a request over `--max-body-bytes` is refused before the app reads it."""
from __future__ import annotations

from gptmini.server.schema import ApiError


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

