"""Continuous batching: one thread owns a model and a SlotCache, and advances every running sequence by one
token per step, admitting new sequences between steps (Orca, Yu et al., 2022; vLLM's scheduler).

A step: drop the sequences whose client went away, prefill waiting prompts into free rows (each prompt alone,
so it sees exactly what `gptmini generate` sees), then one decode forward over all running rows. Each
sequence samples from its own row with its own parameters and its own seeded generator, so its text does not
depend on what else is in the batch; greedy ones give `gptmini generate`'s tokens.

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

from gptmini.generate import sample_next, sampling_mask
from gptmini.model import GPTOSSMini, SlotCache
from gptmini.tokenizer import Tokenizer

log = logging.getLogger("gptmini.engine")


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


class TextStream:
    """Token ids to text as it becomes safe to send: whole UTF-8 characters only, and nothing that may turn
    out to be the start of a stop string. A stop string ends the text before it."""

    def __init__(self, tokenizer: Tokenizer, stop: Seq[str]):
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


Emit = Callable[[str, "str | None"], None]


@dataclass(eq=False)
class Sequence:
    """One generation: its prompt ids, its sampling parameters, and where its text goes. `emit(delta, None)`
    reports text; the last call has finish_reason "stop" or "length" (or "error", with the message as delta)."""

    prompt: list[int]
    sampling: Sampling
    emit: Emit
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    text: TextStream | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Serves one model: `submit` queues sequences, a background thread generates them in batches of up to
    `max_batch`. `close()` lets it finish what it holds, then stops the thread."""

    def __init__(self, model: GPTOSSMini, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64,
                 name: str = "gptmini"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_batch, self.max_queue = max_batch, max_queue
        # The final norm gives the activations' device and dtype (int8 weights leave the norms as they were).
        self.device, dtype = model.norm.weight.device, model.norm.weight.dtype
        self.cache = SlotCache(model.config, max_batch, self.device, dtype)
        self.allowed = sampling_mask(tokenizer, model.config.vocab_size, self.device)
        self.eot = tokenizer.eot_token
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i] lives in cache row i
        # Batched decode steps so far, and the most sequences one of them advanced: what batching shares.
        self.decode_steps = self.peak_occupancy = 0
        self.closing = self.closed = False
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=f"engine[{name}]", daemon=True)
        self.thread.start()

    @property
    def max_seq_len(self) -> int:
        return self.model.config.max_seq_len

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
        return len(self.running)

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.waiting or self.running or self.closing):
                    self.lock.wait()
                if self.closing and not (self.waiting or self.running):
                    self.closed = True
                    return
                admit = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.running)))]
            try:
                self._step(admit)
            except Exception as exc:  # a bug or an out-of-memory: fail what runs, keep serving
                log.exception("engine %s: a step failed; failing its %d running requests", self.name, len(self.running))
                for seq in self.running + admit:
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.emit(f"generation failed: {type(exc).__name__}: {exc}", "error")
                self.running = []

    @torch.inference_mode()
    def _step(self, admit: list[Sequence]) -> None:
        self._retire([i for i, seq in enumerate(self.running) if seq.cancelled])
        for seq in admit:
            if seq.cancelled:
                continue
            row = len(self.running)
            self.running.append(seq)
            self.cache.start(row)
            logits, _ = self.model(torch.tensor([seq.prompt], device=self.device), cache=self.cache, last_only=True)
            self._advance([seq], logits[:, -1])
            self._retire([row] if seq.finish_reason else [])
        if not self.running:
            return
        n = len(self.running)
        self.decode_steps += 1
        self.peak_occupancy = max(self.peak_occupancy, n)
        self.cache.step(n)
        idx = torch.tensor([seq.tokens[-1:] for seq in self.running], device=self.device)  # (n, 1)
        logits, _ = self.model(idx, cache=self.cache, last_only=True)
        self._advance(self.running, logits[:, -1])
        self._retire([i for i, seq in enumerate(self.running) if seq.finish_reason or seq.cancelled])

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
        for i, seq in enumerate(seqs):
            self._emit(seq, picked[i])

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.tokens.append(token)
        if token == self.eot and not seq.sampling.ignore_eos:
            return self._finish(seq, "stop", seq.text.flush())
        delta, stopped = seq.text.push(token)
        if stopped:  # the text after the stop string is dropped
            return self._finish(seq, "stop", delta)
        if len(seq.tokens) >= seq.sampling.max_tokens:
            return self._finish(seq, "length", delta + seq.text.flush())
        if delta:
            seq.emit(delta, None)

    def _finish(self, seq: Sequence, reason: str, delta: str) -> None:
        seq.finish_reason = reason
        seq.emit(delta, reason)

    def _retire(self, rows: list[int]) -> None:
        """Free these rows, moving the last running sequence into each hole (highest row first, so no move
        reads a row that is itself about to be freed)."""
        for row in sorted(rows, reverse=True):
            last = len(self.running) - 1
            if row != last:
                self.cache.move(last, row)
                self.running[row] = self.running[last]
            self.running.pop()


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
