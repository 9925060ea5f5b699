"""Inference: the one decode loop. `Batch` owns a model and a KVCache, prefills prompts (whole, or in chunks
between decode steps) and advances every running sequence by one token per step; `Engine` runs a Batch on a
background thread for the server, admitting new sequences between steps (continuous batching: Orca, Yu et
al., 2022; vLLM's scheduler). `gptmini.generate` is a Batch of the caller's prompts run to its end.

A step: drop the sequences whose client went away, prefill waiting prompts into free rows, then one decode
forward over all running rows. Each prompt is prefilled alone, so it sees exactly what it would see alone.
With `prefill_chunk` > 0 a step prefills at most that many prompt tokens, so a long prompt no longer stalls
the running streams for its whole length (Sarathi, Agrawal et al., 2023; vLLM's chunked prefill): while
sequences are running, one chunk of one prompt, in the decode's forward (Sarathi's piggybacking: a chunk in a
forward of its own cost more per token, and a second one per step made the step's cost jump); with none
running, prompt after prompt up to the budget. 0 prefills every admitted prompt whole before the step's
decode. Each sequence samples from its own row with its own parameters and its own generator, so its tokens
do not depend on what else is in the batch.

The engine knows nothing of HTTP: a Sequence reports through its `emit(delta, finish_reason)` callback, called
on the engine's thread (the server hands it on to its event loop).
"""
from __future__ import annotations

import codecs
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gptmini.errors import UserError
from gptmini.model import GPTOSSMini, KVCache
from gptmini.tokenizer import Tokenizer

log = logging.getLogger("gptmini.engine")


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids a text prompt is generated from: a document starts after end-of-text, as in training."""
    return [tokenizer.eot_token] + tokenizer.encode(text)


# Sampling


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} must be >= 1, or None to keep every token")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p} must be in (0, 1], or None to keep every token")


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """One token per row from (B, V) logits. `allowed` (V,) bool masks ids that must never be sampled."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling (Holtzman et al., 2020): the smallest set of tokens whose mass reaches top_p.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reached top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_mask(tokenizer, vocab_size: int, device: torch.device) -> Tensor:
    """True for the ids the tokenizer can decode as text, plus end-of-text (never the vocab padding)."""
    allowed = torch.arange(vocab_size, device=device) < tokenizer.n_ordinary
    allowed[tokenizer.eot_token] = True
    return allowed


# Text


class TextStream:
    """Token ids to text as it becomes safe to send: whole UTF-8 characters only (a character can span
    several tokens), and nothing that may turn out to be the start of a stop string. A stop string ends the
    text before it."""

    def __init__(self, tokenizer: Tokenizer, stop: Seq[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent = "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """The text now safe to send, and whether a stop string was reached."""
        self.text += self.utf8.decode(self.tokenizer.decode_bytes([token]))
        if self.stop:
            longest = max(map(len, self.stop))
            start = max(0, self.sent - longest)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                return self._take(min(hits)), True
        return self._take(len(self.text) - self._held()), False

    def flush(self) -> str:
        self.text += self.utf8.decode(b"", final=True)
        return self._take(len(self.text))

    def _held(self) -> int:
        """Characters at the end that are a proper prefix of some stop string."""
        tail = self.text[self.sent:]
        return max((j for s in self.stop for j in range(1, min(len(s), len(tail) + 1))
                    if tail.endswith(s[:j])), default=0)

    def _take(self, end: int) -> str:
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


# Sequences


class QueueFull(Exception):
    """The waiting queue is at its limit; the client should retry later."""


class EngineClosed(Exception):
    """The engine has drained and stopped (its model was swapped out); submit to the new one."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # each new token's log-probability and this many most likely alternatives
    echo: bool = False  # with logprobs: the prompt tokens' log-probabilities too


Emit = Callable[[str, "str | None"], None]
# A token's log-probability under the model (log-softmax of its logits, before sampling's temperature or
# truncation) and the `logprobs` most likely (token, log-probability) at its position.
TokenLogprob = tuple[float, list[tuple[int, float]]]


@dataclass(eq=False)
class Sequence:
    """One generation: its prompt ids, its sampling parameters, and where its text goes. `emit(delta, None)`
    reports text; the last call has finish_reason "stop" or "length" (or "error", with the message as delta).
    Without `text` (a TextStream) it only collects `tokens`."""

    prompt: list[int]
    sampling: Sampling
    emit: Emit | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    text: TextStream | None = None
    prefilled: int = 0  # prompt tokens in the cache
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per new token, with Sampling.logprobs
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt[1:]'s, with Sampling.echo

    def cancel(self) -> None:
        self.cancelled = True

    def finish(self, reason: str, delta: str) -> None:
        self.finish_reason = reason
        if self.emit is not None:
            self.emit(delta, reason)


def token_logprobs(logits: Tensor, tokens: Tensor, top: int) -> list[TokenLogprob]:
    """(log-probability of tokens[i], its `top` alternatives) for each row of (n, V) logits."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
    if not top:
        return [(c, []) for c in chosen]
    values, ids = lp.topk(top, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


class Batch:
    """The running batch: up to `rows` sequences in a KVCache, advanced together by `step`.

    Rows 0..n-1 hold the decoding sequences (`running`); with chunked prefill, the one prompt being
    prefilled sits in row n. `eot` ends a sequence unless its sampling ignores it; `allowed` masks ids
    sampling must never pick; `max_len` is the longest sequence a row holds (the cache's length). Without
    `use_cache` every step recomputes each sequence from its first token (the reference the cache is tested
    against). Counters: `decode_steps`, `peak_occupancy` (the most rows one decode step advanced),
    `prefill_chunks`, `decode_steps_mid_prefill` (decode steps taken while a prompt was part-way in) and
    `chunks_in_decode` (prompt chunks computed in a decode step's forward rather than in one of their own).
    """

    def __init__(self, model: GPTOSSMini, rows: int, *, eot: int | None = None, allowed: Tensor | None = None,
                 max_len: int | None = None, prefill_chunk: int = 0, use_cache: bool = True):
        self.model, self.rows, self.eot, self.allowed = model, rows, eot, allowed
        self.prefill_chunk, self.use_cache = prefill_chunk, use_cache
        # The final norm gives the activations' device and dtype (int8 weights leave the norms as they were).
        self.device, dtype = model.norm.weight.device, model.norm.weight.dtype
        self.cache = KVCache(model.config, rows, self.device, dtype, max_len)
        self.running: list[Sequence] = []  # running[i] lives in cache row i
        self.prefilling: Sequence | None = None  # lives in row len(running)
        self.admitted: list[Sequence] = []  # taken from the queue, not yet prefilled
        self.decode_steps = self.peak_occupancy = self.prefill_chunks = self.decode_steps_mid_prefill = 0
        self.chunks_in_decode = 0

    @property
    def occupancy(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.prefilling or self.admitted)

    def step(self, take: Callable[[int], list[Sequence]], decode: bool = True) -> None:
        """Prefill what `take(k)` (up to k waiting sequences) gives into free rows, then one decode step
        (unless `decode` is False: a caller that hands out each prompt's first token before the second)."""
        self._retire([i for i, seq in enumerate(self.running) if seq.cancelled])
        if self.prefilling is not None and self.prefilling.cancelled:
            self.prefilling = None
        started: list[tuple[Sequence, Tensor]] = []  # prompts now in, with their last position's hidden state
        self.decoded = not decode  # whether this step's decode has run (or is not to run)
        if self.prefill_chunk:
            self._prefill_chunks(take, started)
        else:
            self.admitted = take(self.rows - len(self.running))
            while self.admitted:
                seq = self.admitted.pop(0)
                if not seq.cancelled:
                    self._prefill(seq, len(seq.prompt), started)
        if started:
            self._start(started)
        if self.running and not self.decoded:
            self._decode()

    def abandon(self) -> list[Sequence]:
        """Drop every sequence held (after a failed step) and return them."""
        held = self.running + self.admitted + ([self.prefilling] if self.prefilling else [])
        self.running, self.admitted, self.prefilling = [], [], None
        return held

    def _prefill_chunks(self, take: Callable[[int], list[Sequence]], started: list) -> None:
        budget = self.prefill_chunk
        while budget > 0:
            if self.prefilling is None:
                if len(self.running) >= self.rows:
                    return
                got = take(1)
                if not got:
                    return
                if got[0].cancelled:
                    continue
                self.prefilling = got[0]
            seq = self.prefilling
            n = min(budget, len(seq.prompt) - seq.prefilled)
            budget -= n
            # The decode rows must each hold a sampled token: not a prompt that came in earlier in this step.
            if self.decoded or started or not (self.running and self.use_cache) or seq.sampling.echo:
                self._prefill(seq, n, started)
            else:  # and nothing more this step: another chunk would pay a forward of its own, a step's spike
                return self._decode((seq, n, started))

    @torch.inference_mode()
    def _prefill(self, seq: Sequence, n: int, started: list[tuple[Sequence, Tensor]]) -> None:
        """The next n tokens of seq's prompt into row len(running); after the last, seq joins the running rows
        and `started`, with its last position's hidden state (or, with echo, its logits)."""
        row, start = len(self.running), seq.prefilled
        if start == 0:
            self.cache.reset(row)
        self.cache.prefill(row)
        h = self.model.hidden(torch.tensor([seq.prompt[start : start + n]], device=self.device), self.cache)
        seq.prefilled += n
        self.prefill_chunks += 1
        last = h[0, -1:]  # (1, d)
        if seq.sampling.echo:  # the log-probability of each prompt token after the first, from the position before
            logits = self.model.output(h[0])  # (n, V)
            targets = seq.prompt[start + 1 : start + n + 1]
            seq.prompt_logprobs += token_logprobs(logits[: len(targets)], torch.tensor(targets, device=self.device),
                                                  seq.sampling.logprobs or 0)
            last = logits[-1:]
        if seq.prefilled == len(seq.prompt):
            self._prompt_in(seq, last, started)

    def _prompt_in(self, seq: Sequence, last: Tensor, started: list[tuple[Sequence, Tensor]]) -> None:
        """seq's prompt is all in: it joins the running rows and `started`, with its last position's hidden
        state (or, with echo, its logits)."""
        if self.prefilling is seq:
            self.prefilling = None
        self.running.append(seq)
        started.append((seq, last))

    @torch.inference_mode()
    def _start(self, started: list[tuple[Sequence, Tensor]]) -> None:
        """Sample the first token of each prompt prefilled this step: the output head runs once for all (at
        batch 1 a decode step is mostly the reading of its weights)."""
        hidden = [i for i, (seq, _) in enumerate(started) if not seq.sampling.echo]
        logits = [last for _, last in started]
        if hidden:
            for i, row in zip(hidden, self.model.output(torch.cat([logits[i] for i in hidden]))):
                logits[i] = row[None]
        self._advance([seq for seq, _ in started], torch.cat(logits))
        self._retire([i for i, seq in enumerate(self.running) if seq.finish_reason])

    @torch.inference_mode()
    def _decode(self, chunk: tuple[Sequence, int, list[tuple[Sequence, Tensor]]] | None = None) -> None:
        """One token for each running sequence. With `chunk` (seq, k, started), the next k tokens of seq's
        prompt (in row len(running)) go in the same forward: they ride in the decode's matmuls instead of paying
        a forward of their own (Sarathi)."""
        decoding, n = list(self.running), len(self.running)
        self.decoded = True
        self.decode_steps += 1
        self.peak_occupancy = max(self.peak_occupancy, n)
        if chunk is not None:
            seq, k, started = chunk
            start = seq.prefilled
            if start == 0:
                self.cache.reset(n)
            self.cache.mixed(n)
            ids = [s.tokens[-1] for s in decoding] + seq.prompt[start : start + k]
            h = self.model.hidden(torch.tensor([ids], device=self.device), self.cache)[0]  # (n + k, d)
            seq.prefilled += k
            self.prefill_chunks += 1
            self.chunks_in_decode += 1
            if seq.prefilled == len(seq.prompt):
                self._prompt_in(seq, h[-1:], started)
            h = h[:n]
        elif self.use_cache:
            self.cache.decode(n)
            idx = torch.tensor([seq.tokens[-1:] for seq in decoding], device=self.device)  # (n, 1)
            h = self.model.hidden(idx, self.cache)[:, -1]
        else:
            h = torch.cat([self._recompute(row, seq) for row, seq in enumerate(decoding)])
        self.decode_steps_mid_prefill += self.prefilling is not None
        self._advance(decoding, self.model.output(h))
        self._retire([i for i, seq in enumerate(self.running) if seq.finish_reason or seq.cancelled])

    def _recompute(self, row: int, seq: Sequence) -> Tensor:
        self.cache.reset(row)
        self.cache.prefill(row)
        return self.model.hidden(torch.tensor([seq.prompt + seq.tokens], device=self.device), self.cache)[:, -1]

    def _advance(self, seqs: list[Sequence], logits: Tensor) -> None:
        """Sample one token for each of `seqs` from its row of (len(seqs), V) logits and report it."""
        greedy = [i for i, seq in enumerate(seqs) if seq.sampling.temperature == 0]
        picked: dict[int, int] = {}
        if greedy:  # one argmax over all greedy rows
            picked.update(zip(greedy, sample_next(logits[greedy], 0.0, allowed=self.allowed).tolist()))
        for i, seq in enumerate(seqs):
            if i not in picked:
                s = seq.sampling
                picked[i] = int(sample_next(logits[i : i + 1], s.temperature, s.top_k, s.top_p, seq.generator,
                                            self.allowed))
        scored = [i for i, seq in enumerate(seqs) if seq.sampling.logprobs is not None]
        if scored:
            tokens = torch.tensor([picked[i] for i in scored], device=logits.device)
            top = max(seqs[i].sampling.logprobs for i in scored)
            for i, (lp, alts) in zip(scored, token_logprobs(logits[scored], tokens, top)):
                seqs[i].logprobs.append((lp, alts[: seqs[i].sampling.logprobs]))
        for i, seq in enumerate(seqs):
            self._emit(seq, picked[i])

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.tokens.append(token)
        text = seq.text
        if token == self.eot and not seq.sampling.ignore_eos:
            return seq.finish("stop", text.flush() if text else "")
        delta, stopped = text.push(token) if text else ("", False)
        if stopped:  # the text after the stop string is dropped
            return seq.finish("stop", delta)
        if len(seq.tokens) >= seq.sampling.max_tokens:
            return seq.finish("length", delta + text.flush() if text else "")
        if delta:
            seq.emit(delta, None)

    def _retire(self, rows: list[int]) -> None:
        """Free these rows, moving the last running sequence into each hole (highest row first, so no move
        reads a row that is itself about to be freed); a prompt part-way in follows the running rows."""
        prefill_row = len(self.running)
        for row in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if row != last:
                self.cache.move(last, row)
                self.running[row] = self.running[last]
            self.running.pop()
        if self.prefilling is not None and prefill_row != len(self.running):
            self.cache.move(prefill_row, len(self.running))


class Engine:
    """Serves one model: `submit` queues sequences, a background thread generates them in batches of up to
    `max_batch` (a Batch). `close()` lets it finish what it holds, then stops the thread."""

    def __init__(self, model: GPTOSSMini, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64,
                 name: str = "gptmini", prefill_chunk: int = 0):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = model.norm.weight.device
        self.batch = Batch(model, max_batch, eot=tokenizer.eot_token, prefill_chunk=prefill_chunk,
                           allowed=sampling_mask(tokenizer, model.config.vocab_size, self.device))
        self.waiting: deque[Sequence] = deque()
        self.closing = self.closed = False
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=f"engine[{name}]", daemon=True)
        self.thread.start()

    @property
    def max_seq_len(self) -> int:
        return self.model.config.max_seq_len

    @property
    def decode_steps(self) -> int:
        return self.batch.decode_steps

    @property
    def peak_occupancy(self) -> int:
        return self.batch.peak_occupancy

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of `seqs` or none of them (QueueFull, EngineClosed)."""
        for seq in seqs:
            if len(seq.prompt) + seq.sampling.max_tokens > self.max_seq_len:
                raise ValueError(f"prompt ({len(seq.prompt)} tokens) + max_tokens ({seq.sampling.max_tokens}) "
                                 f"exceeds max_seq_len={self.max_seq_len}")
        with self.lock:
            if self.closing:
                raise EngineClosed(self.name)
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit is {self.max_queue})")
            for seq in seqs:
                seq.text = TextStream(self.tokenizer, seq.sampling.stop)
                if seq.generator is not None:  # a generation in parts (retrieval's stride) keeps one stream
                    continue
                seq.generator = torch.Generator(device=self.device)
                if seq.sampling.seed is None:
                    seq.generator.seed()
                else:
                    seq.generator.manual_seed(seq.sampling.seed)
            self.waiting.extend(seqs)
            self.lock.notify()

    def wake(self) -> None:
        """Let the loop notice a cancellation now rather than at its next step."""
        with self.lock:
            self.lock.notify()

    def close(self, wait: bool = False) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify()
        if wait:
            self.thread.join()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def occupancy(self) -> int:
        return self.batch.occupancy

    def _take(self, k: int) -> list[Sequence]:
        with self.lock:
            return [self.waiting.popleft() for _ in range(min(k, len(self.waiting)))]

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.waiting or self.batch.busy or self.closing):
                    self.lock.wait()
                if self.closing and not (self.waiting or self.batch.busy):
                    self.closed = True
                    return
            try:
                self.batch.step(self._take)
            except Exception as exc:  # a bug or an out-of-memory: fail what runs, keep serving
                held = self.batch.abandon()
                log.exception("engine %s: a step failed; failing its %d requests", self.name, len(held))
                for seq in held:
                    if seq.finish_reason is None:
                        seq.finish("error", f"generation failed: {type(exc).__name__}: {exc}")


def generate_one(engine: Engine, prompt: list[int], sampling: Sampling, timeout: float = 300) -> tuple[str, str, int]:
    """Run one sequence to its end: (text, finish_reason, tokens generated). For scripts and tests."""
    done = threading.Event()
    parts: list[str] = []

    def emit(delta: str, reason: str | None) -> None:
        parts.append(delta)
        if reason:
            done.set()

    seq = Sequence(prompt, sampling, emit)
    engine.submit([seq])
    if not done.wait(timeout):
        seq.cancel()
        raise TimeoutError(f"no answer from engine {engine.name} within {timeout} s")
    return "".join(parts), seq.finish_reason, len(seq.tokens)
