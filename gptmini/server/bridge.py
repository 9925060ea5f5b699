"""The async bridge: one request's sequences run on the engine's thread, and their text comes back as events
on the event loop."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gptmini.engine import EngineClosed, QueueFull, Sampling, Sequence, prompt_ids
from gptmini.server.host import ModelHost
from gptmini.server.retrieval import Strided, check_available, request_options, with_passages
from gptmini.server.schema import ApiError, GenerationRequest
from gptmini.tokenizer import Tokenizer


@dataclass
class Choice:
    seq: Sequence
    index: int
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    last_event: float | None = None
    citations: list[dict] | None = None  # the passages read before its prompt; None: retrieval was off
    echo: str | None = None  # the prompt's text, which `echo` puts before the completion
    echoed: int = 0  # the prompt's last tokens that echo's logprobs cover (a text prompt's framing is not one)


class Generation:
    """The sequences of one request (prompts x n) and the events they send back to the event loop."""

    def __init__(self, host: ModelHost, body: GenerationRequest, prompts: list[str | list[int]], endpoint: str,
                 extra_stop: tuple[str, ...] = ()):
        self.host, self.endpoint, self.started = host, endpoint, time.perf_counter()
        self.served = host.require(body.model)
        # Completions: `logprobs` alternatives per token (None: no logprobs); chat: `top_logprobs` of them.
        logprobs = getattr(body, "logprobs", None)
        if endpoint == "chat":
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        echo = getattr(body, "echo", False)
        cap, limit = host.config.max_tokens, host.config.max_queue
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > cap:
            name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise ApiError(400, f"{name}={asked} is above this server's cap of {cap} (--max-tokens)", param=name,
                           code="invalid_value")
        if len(prompts) * body.n > limit:  # more than the queue holds: it could never be admitted
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={body.n} is {len(prompts) * body.n} sequences; this "
                                f"server takes at most {limit} per request (--max-queue): send at most "
                                f"{max(limit // body.n, 1)} prompts per request, or a lower n",
                           param="prompt" if len(prompts) > 1 else "n", code="invalid_value")
        self.tokenizer = tok = self.served.engine.tokenizer
        context = self.served.engine.max_seq_len
        opts = request_options(body.retrieval, host.config.retrieval_k)
        if opts and opts.stride and logprobs is not None:
            raise ApiError(400, "retrieval.stride cannot be combined with logprobs: each stride reads a new context; "
                                "leave out one of them", param="retrieval.stride", code="invalid_value")
        opts = check_available(self.served, body.retrieval, opts)
        ids = [prompt_ids(tok, p) if isinstance(p, str) else checked_ids(tok, p) for p in prompts]
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.choices: list[Choice] = []
        self.strided: list[Strided] = []  # choices that retrieve again every stride tokens
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
            own = len(prompt)  # before any retrieved passage goes in front
            citations = None
            if opts and not opts.stride:
                prompt, citations = with_passages(self.served, prompt, context - max_tokens, opts.k, host.metrics,
                                                  endpoint)
            self.prompt_tokens += len(prompt) * body.n
            for i in range(body.n):
                sampling = Sampling(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                    top_p=body.top_p if body.top_p < 1.0 else None,
                                    seed=None if body.seed is None else body.seed + i,
                                    stop=tuple(body.stop) + extra_stop, ignore_eos=body.ignore_eos,
                                    logprobs=logprobs, echo=echo and logprobs is not None)
                index = len(self.choices)
                if opts and opts.stride:
                    run = Strided(prompt, sampling, opts, self._emitter(index), host.metrics, endpoint)
                    self.strided.append(run)
                    choice = Choice(run.seq, index, citations=run.citations)
                else:
                    choice = Choice(Sequence(prompt, sampling, self._emitter(index)), index, citations=citations)
                if echo:
                    text = prompts[p]
                    choice.echo = text if isinstance(text, str) else tok.decode(text)
                    choice.echoed = own - 1 if isinstance(text, str) else own
                self.choices.append(choice)
        self.pending = len(self.choices)

    def token_text(self, token: int) -> str:
        """A token's text; one that ends mid-character shows its bytes, as OpenAI's `bytes:\\xe2` does."""
        raw = self.tokenizer.decode_bytes([token])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _emitter(self, index: int) -> Callable[[str, str | None], None]:
        def emit(delta: str, reason: str | None) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, delta, reason, time.perf_counter()))
        return emit

    def submit(self) -> None:
        strided = {id(run.seq) for run in self.strided}
        seqs = [c.seq for c in self.choices if id(c.seq) not in strided]
        for _ in range(3):  # a swap can close the engine between require() and here: take the new one
            try:
                if seqs:
                    self.served.engine.submit(seqs)
                for run in self.strided:
                    run.start(self.served)
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



def checked_ids(tok: Tokenizer, ids: list[int]) -> list[int]:
    """A token-id prompt, used as given (as OpenAI's are: no end-of-text is put before it)."""
    for t in ids:
        if t >= tok.n_ordinary and t != tok.eot_token:
            raise ApiError(400, f"token id {t} is not in the model's vocabulary (ids 0..{tok.n_ordinary - 1} "
                                f"and end-of-text {tok.eot_token}); encode the prompt with the model's tokenizer",
                           param="prompt", code="invalid_value")
    return ids
