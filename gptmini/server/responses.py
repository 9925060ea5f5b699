"""A generation as an HTTP response: one JSON body, or server-sent events in OpenAI's chunk format."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptmini.engine import TokenLogprob
from gptmini.server.bridge import Choice, Generation
from gptmini.server.schema import ApiError, GenerationRequest


def cited(choice: Choice, row: dict, last: bool = True) -> dict:
    """A choice with its citations, when retrieval was on (a stream sends them with the last chunk)."""
    return row | {"citations": choice.citations} if choice.citations is not None and last else row


def completion_chunk(rid: str, gen: Generation, choice: Choice, delta: str, reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": gen.served.label,
            "choices": [cited(choice, {"index": choice.index, "text": delta, "finish_reason": reason,
                                       "logprobs": None}, reason is not None)]}


def completion_body(rid: str, gen: Generation) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": gen.served.label,
            "choices": [cited(c, {"index": c.index, "text": (c.echo or "") + "".join(c.text),
                                  "finish_reason": c.finish_reason, "logprobs": completion_logprobs(gen, c)})
                        for c in gen.choices], "usage": gen.usage()}


def scored_tokens(c: Choice) -> list[tuple[int, TokenLogprob | None]]:
    """(token, its log-probability and alternatives) for the echoed prompt tokens, then the new ones. A token-id
    prompt's first token has no context, so no log-probability (None), as in OpenAI's echo."""
    s = c.seq
    prompt = list(zip(s.prompt, [None, *s.prompt_logprobs]))[len(s.prompt) - c.echoed:] if c.echoed else []
    return prompt + list(zip(s.tokens, s.logprobs))


def completion_logprobs(gen: Generation, c: Choice) -> dict | None:
    """OpenAI's completions shape: tokens, token_logprobs, top_logprobs (token -> log-probability) and
    text_offset (where each token starts in the choice's text)."""
    if c.seq.sampling.logprobs is None:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token, scored in scored_tokens(c):
        text = gen.token_text(token)
        out["tokens"].append(text)
        out["token_logprobs"].append(scored[0] if scored else None)
        out["top_logprobs"].append({gen.token_text(t): lp for t, lp in scored[1]} if scored else None)
        out["text_offset"].append(offset)
        offset += len(gen.tokenizer.decode([token]))
    return out


def chat_logprobs(gen: Generation, c: Choice) -> dict | None:
    """OpenAI's chat shape: content[] of {token, logprob, bytes, top_logprobs[] of {token, logprob, bytes}}."""
    if c.seq.sampling.logprobs is None:
        return None

    def entry(token: int, lp: float) -> dict:
        return {"token": gen.token_text(token), "logprob": lp, "bytes": list(gen.tokenizer.decode_bytes([token]))}

    return {"content": [entry(t, lp) | {"top_logprobs": [entry(a, alp) for a, alp in alts]}
                        for t, (lp, alts) in zip(c.seq.tokens, c.seq.logprobs)], "refusal": None}


def chat_chunk(rid: str, gen: Generation, choice: Choice, delta: str, reason: str | None) -> dict:
    # The stream opens with the role alone, as OpenAI's does; every later chunk carries content only.
    message = {"content": delta} if choice.text or reason else {"role": "assistant", "content": ""}
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": gen.served.label,
            "choices": [cited(choice, {"index": choice.index, "delta": message, "finish_reason": reason,
                                       "logprobs": None}, reason is not None)]}


def chat_body(rid: str, gen: Generation) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": gen.served.label,
            "choices": [cited(c, {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                                  "finish_reason": c.finish_reason, "logprobs": chat_logprobs(gen, c)})
                        for c in gen.choices],
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

