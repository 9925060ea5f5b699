"""The OpenAI request schema, and its errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}},
whose message names the field and the limit.

Requests carry OpenAI's fields, strictly typed; the extensions are top_k and ignore_eos (vLLM's names).
"""
from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI allows
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as OpenAI documents; choice i samples with seed + i
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's chat allows 20)
CHAT_STOP = "\nUser:"
CHAT_TEMPLATE = """A system (or developer) message opens the text; each turn is one line; the model continues
after the final "Assistant:", and stops where it would start the user's next turn ("\\nUser:"):

    {system}

    User: {user message}
    Assistant: {assistant message}
    User: {user message}
    Assistant:"""


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


IGNORED = {"user", "metadata", "store", "service_tier", "stream_options"}
# Fields we do not implement, accepted only at the value that means "off".
NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "best_of": (None, 1), "logit_bias": (None, {}),
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
    retrieval: Any = None  # true, false or {"k": N}: gptmini.server.retrieval

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        low, high = SEED_RANGE
        if v is not None and not low <= v <= high:
            raise param_error("seed", f"seed={v} is out of range: a seed is a signed 64-bit integer, from {low} to "
                                      f"{high}")
        return v

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
                raise param_error(key[:60], f"unrecognized request argument {_short(key)}")
            if value not in NEUTRAL[key]:
                raise param_error(key, f"{key}={_short(value)} is not supported by gptmini serve; leave it out")
        return self


def _logprobs_unstreamed(self: GenerationRequest, asked: bool) -> None:
    if asked and self.stream:
        raise param_error("stream", "logprobs and echo are returned with the whole response; "
                                    "leave out stream, or logprobs and echo")


class CompletionRequest(GenerationRequest):
    prompt: Any = Field(...)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        """A string, a list of strings, a list of token ids, or a list of such lists (OpenAI's four forms)."""
        if isinstance(v, str) or (isinstance(v, list) and v and all(_is_id(t) for t in v)):
            v = [v]
        if not isinstance(v, list) or not v or not all(
                isinstance(p, str) or (isinstance(p, list) and p and all(_is_id(t) for t in p)) for p in v):
            raise param_error("prompt", "prompt must be a string, a list of strings, a non-empty list of token ids, "
                                        f"or a list of such lists; got {_short(v)}")
        for i, p in enumerate(v):
            if isinstance(p, str):
                _check_text(p, "prompt" if len(v) == 1 else f"prompt[{i}]")
        return v

    @model_validator(mode="after")
    def _streamed(self) -> CompletionRequest:
        _logprobs_unstreamed(self, self.logprobs is not None or self.echo)
        return self


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


class ChatRequest(GenerationRequest):
    messages: Any = Field(...)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise param_error("top_logprobs", "top_logprobs needs logprobs: true")
        _logprobs_unstreamed(self, self.logprobs)
        return self

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
            _check_text(content, f"messages[{i}].content")
            out.append((role, content))
        return out


def _check_text(text: str, param: str) -> None:
    """JSON's \\uD800-style escapes can carry a lone surrogate, which is no character and has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise param_error(param, f"{param} holds {text[exc.start]!r} at character {exc.start}, a lone UTF-16 "
                                 "surrogate that is not a character; send valid Unicode text") from None


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


def validation_error(exc: RequestValidationError, content_type: str) -> ApiError:
    """The first problem, as one message that names the field (FastAPI's default is a 422 list)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({detail}); send a JSON object", code="invalid_json")
    ctx = err.get("ctx") or {}
    if not loc and "param" not in ctx and "json" not in content_type:  # FastAPI reads a body as JSON only when the header says so
        return ApiError(415, f"the request body must be JSON, sent with `Content-Type: application/json` (got "
                             f"{content_type or 'no Content-Type'!r})", code="unsupported_media_type")
    if not loc and "param" not in ctx:  # null, a list, a number or no body at all
        got = "null or nothing" if err.get("input") is None else _short(err.get("input"))
        return ApiError(400, f"the request body must be a JSON object; got {got}",
                        code="invalid_type")
    param = ctx.get("param") or loc[0]
    if err.get("type") == "missing":
        return ApiError(400, f"missing required field {param!r}", param=param, code="missing_field")
    message = ctx.get("message") or err.get("msg", "invalid value")
    if "message" not in ctx:
        message = f"{'.'.join(loc)}: {message} (got {_short(err.get('input'))})"
    return ApiError(400, message, param=param, code="invalid_value")


def parse_error(exc: HTTPException, method: str, path: str) -> ApiError:
    """Starlette's own errors (no such route, wrong method) and a body FastAPI could not decode, in OpenAI's
    shape. FastAPI raises the body's decoding error as the cause of a plain 400."""
    cause = exc.__cause__
    if isinstance(cause, ApiError):  # the body limit, met while FastAPI read the body
        return cause
    if isinstance(cause, UnicodeDecodeError):
        return ApiError(400, f"the request body is not valid UTF-8 (byte {cause.object[cause.start]:#04x} at offset "
                             f"{cause.start}); send JSON encoded as UTF-8", code="invalid_json")
    if isinstance(cause, RecursionError):
        return ApiError(400, "the request body's JSON is nested too deeply to parse; no request field nests more "
                             "than a few levels", code="invalid_json")
    where = f"{method} {path[:100]}"
    if exc.status_code == 404:
        return ApiError(404, f"no such endpoint: {where}; this server answers POST /v1/completions, POST "
                             "/v1/chat/completions and GET /v1/models", code="unknown_url")
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return ApiError(405, f"{where} is not allowed; this path takes {allow}", code="method_not_allowed",
                        headers=exc.headers)
    return ApiError(exc.status_code, f"{where}: {exc.detail}", headers=exc.headers)
