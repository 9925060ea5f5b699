"""The continuous-batching engine in process: per-row caches, per-request sampling, stop strings, slots freed.

The model is `sharp_model` (large weights), so a cache row that read another row's keys, or a position off by
one, changes the greedy tokens.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import pytest
import torch

from gptmini.engine import Batch, Engine, QueueFull, Sampling, Sequence, TextStream, generate_one
from gptmini.generate import generate_text
from gptmini.model import GPTOSSMini, KVCache
from gptmini.tokenizer import get_tokenizer
from model_helpers import sharp_model, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Hello world", "The Python interpreter", "a", "import os\nimport sys\n", "def f(x):", "class A:",
           "x = 1", "while True:"]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("cl100k_base")


def model_of(**overrides) -> GPTOSSMini:
    return sharp_model(tiny(vocab_size=100352, max_seq_len=64, **overrides))


def run_together(engine: Engine, tok, prompts: list[str], samplings: list[Sampling], stagger: float = 0.0):
    """Submit each prompt from its own thread (`stagger` seconds apart) and return their (text, reason, n)."""
    out: dict[int, tuple] = {}

    def one(i: int) -> None:
        out[i] = generate_one(engine, [tok.eot_token] + tok.encode(prompts[i]), samplings[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join()
    return [out[i] for i in range(len(prompts))]


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 6}, {"num_experts": 0}],
                         ids=["moe", "sliding-window-ring", "dense"])
def test_greedy_requests_batched_at_different_times_match_generate(tok, overrides):
    model = model_of(**overrides)
    engine = Engine(model, tok, max_batch=3)  # 8 prompts through 3 rows: rows are reused and compacted
    try:
        lengths = [20, 7, 15, 3, 20, 11, 1, 9]
        got = run_together(engine, tok, PROMPTS, [Sampling(max_tokens=n, temperature=0) for n in lengths], 0.01)
    finally:
        engine.close(wait=True)
    for prompt, n, (text, reason, count) in zip(PROMPTS, lengths, got):
        assert text == generate_text(model, tok, prompt, max_new_tokens=n, temperature=0)
        assert count <= n and (reason == "length") == (count == n)


def test_concurrent_requests_share_decode_steps(tok):
    """Six requests of 20 tokens at once: one batched step advances all six, so about 20 decode steps serve
    120 tokens. An engine that served them one at a time would take about 120."""
    engine = Engine(model_of(), tok, max_batch=8)
    finished = threading.Semaphore(0)
    seqs = [Sequence([tok.eot_token] + tok.encode(p), Sampling(max_tokens=20, temperature=0, ignore_eos=True),
                     lambda d, r: r and finished.release()) for p in PROMPTS[:6]]
    try:
        engine.submit(seqs)
        for _ in seqs:
            assert finished.acquire(timeout=60)
    finally:
        engine.close(wait=True)
    assert sum(len(s.tokens) for s in seqs) == 120
    assert engine.peak_occupancy == 6
    assert engine.decode_steps <= 20  # each prefill samples the first token; decode steps the other 19


def test_a_seeded_request_gives_the_same_text_alone_or_in_a_full_batch(tok):
    model = model_of()
    engine = Engine(model, tok, max_batch=6)
    try:
        mine = Sampling(max_tokens=25, temperature=1.0, top_k=40, top_p=0.9, seed=7)
        alone = generate_one(engine, [tok.eot_token] + tok.encode("The Python"), mine)
        others = [Sampling(max_tokens=25, temperature=t, seed=s) for t, s in ((1.3, 1), (0.0, None), (0.7, 2))]
        crowd = run_together(engine, tok, ["x", "The Python", "y = 2", "def g():"],
                             [others[0], mine, others[1], others[2]])
    finally:
        engine.close(wait=True)
    assert crowd[1] == alone
    assert alone[0] == generate_text(model, tok, "The Python", max_new_tokens=25, temperature=1.0, top_k=40,
                                     top_p=0.9, seed=7)


def test_cache_rows_keep_their_own_positions_after_a_move():
    """Row 2's sequence moved into row 0 decodes exactly as it would have in row 2."""
    torch.manual_seed(0)
    model = model_of(sliding_window=5)
    prompts = [torch.randint(0, 1000, (1, n)) for n in (3, 9, 6)]

    def decode(move: bool) -> torch.Tensor:
        cache = KVCache(model.config, 3, torch.device("cpu"), torch.float32)
        for row, p in enumerate(prompts):
            cache.prefill(row)
            model(p, cache=cache)
        rows = [2, 1, 0] if move else [0, 1, 2]
        if move:  # 0 finished: 2 takes its place
            cache.move(2, 0)
        cache.decode(2 if move else 3)
        idx = torch.tensor([[5], [6]] if move else [[7], [6], [5]])
        logits = model(idx, cache=cache)
        return logits[rows.index(2) if not move else 0]

    torch.testing.assert_close(decode(move=True), decode(move=False))


def test_stop_strings_end_the_text_before_them_and_partial_matches_are_held(tok):
    stream = TextStream(tok, ["END", "\n\n"])
    sent = []
    for piece in ["Hello", " E", "N", "D", " more"]:
        for t in tok.encode(piece):
            delta, stopped = stream.push(t)
            sent.append(delta)
            if stopped:
                break
        if stopped:
            break
    assert stopped and "".join(sent) == "Hello "
    assert "E" not in sent[1]  # " E" could begin "END": it was held back, not sent and then taken back

    stream = TextStream(tok, ["END"])
    parts = [stream.push(t)[0] for t in tok.encode("Hello E")]
    assert "".join(parts) + stream.flush() == "Hello E"  # a partial match that never completes is sent at the end


def test_a_cancelled_sequence_leaves_its_slot_and_the_others_finish(tok):
    engine = Engine(model_of(), tok, max_batch=2)
    try:
        events = []
        seq = Sequence([tok.eot_token], Sampling(max_tokens=60, temperature=0, ignore_eos=True),
                       lambda d, r: events.append(r))
        engine.submit([seq])
        while len(events) < 3:
            time.sleep(0.005)
        seq.cancel()
        engine.wake()
        deadline = time.monotonic() + 10
        while engine.occupancy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.occupancy == 0 and len(seq.tokens) < 60
        assert generate_one(engine, [tok.eot_token], Sampling(max_tokens=5, temperature=0))[1] in ("length", "stop")
    finally:
        engine.close(wait=True)


def test_a_full_queue_refuses_the_whole_request(tok):
    engine = Engine(model_of(), tok, max_batch=1, max_queue=2)
    block = threading.Event()
    try:
        # One long sequence holds the only row; the queue then takes 2 and refuses a third.
        engine.submit([Sequence([tok.eot_token], Sampling(max_tokens=60, temperature=0, ignore_eos=True),
                                lambda d, r: block.wait())])
        time.sleep(0.1)
        queued = [Sequence([tok.eot_token], Sampling(max_tokens=1), lambda d, r: None) for _ in range(2)]
        engine.submit(queued)
        with pytest.raises(QueueFull, match="limit is 2"):
            engine.submit([Sequence([tok.eot_token], Sampling(max_tokens=1), lambda d, r: None)])
    finally:
        block.set()
        engine.close(wait=True)


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 6}], ids=["moe", "sliding-window-ring"])
def test_chunked_prefill_interleaves_decode_steps_and_gives_the_same_greedy_tokens(tok, overrides):
    """A 41-token prompt arrives while a short one streams: in chunks of 8 it takes 6 steps, each of which
    also advances the running stream; prefilled whole it takes one step that advances nothing else."""
    model = model_of(**overrides)
    short = [tok.eot_token] + tok.encode("Hello world")
    long = ([tok.eot_token] + tok.encode(" ".join(PROMPTS) * 3))[:41]

    def run(chunk: int) -> tuple[list[list[int]], Batch]:
        batch = Batch(model, 2, prefill_chunk=chunk)
        seqs = [Sequence(p, Sampling(max_tokens=n, temperature=0)) for p, n in ((short, 20), (long, 8))]
        waiting = deque(seqs[:1])
        take = lambda k: [waiting.popleft() for _ in range(min(k, len(waiting)))]  # noqa: E731
        batch.step(take)  # the short prompt is in, and streaming
        waiting.append(seqs[1])
        while not all(s.finish_reason for s in seqs):
            batch.step(take)
        return [s.tokens for s in seqs], batch

    whole, unchunked = run(0)
    chunked_tokens, chunked = run(8)
    assert chunked_tokens == whole
    assert len(long) == 41 and chunked.decode_steps_mid_prefill == 5 and unchunked.decode_steps_mid_prefill == 0
    assert chunked.prefill_chunks == 1 + 6
    # Every chunk of the long prompt rode in the decode step's forward; the short prompt, alone, could not.
    assert chunked.chunks_in_decode == 6 and unchunked.chunks_in_decode == 0


def test_with_sequences_running_a_step_prefills_one_chunk_in_its_decode_forward(tok):
    """Two short prompts arrive while one streams, with budget for both: one rides in this step's decode
    forward and the other waits for the next step, rather than paying a forward of its own in this one."""
    model = model_of()
    prompts = [[tok.eot_token] + tok.encode(p) for p in PROMPTS[:3]]
    batch = Batch(model, 3, prefill_chunk=64)
    seqs = [Sequence(p, Sampling(max_tokens=8, temperature=0)) for p in prompts]
    waiting = deque(seqs[:1])
    take = lambda k: [waiting.popleft() for _ in range(min(k, len(waiting)))]  # noqa: E731
    batch.step(take)
    waiting.extend(seqs[1:])
    batch.step(take)
    assert (len(batch.running), len(waiting), batch.chunks_in_decode) == (2, 1, 1)
    batch.step(take)
    assert (len(batch.running), len(waiting), batch.chunks_in_decode) == (3, 0, 2)
    while not all(s.finish_reason for s in seqs):
        batch.step(take)
    alone = [Sequence(p, Sampling(max_tokens=8, temperature=0)) for p in prompts]
    for seq in alone:
        one = Batch(model, 1)
        queue = deque([seq])
        while not seq.finish_reason:
            one.step(lambda k: [queue.popleft() for _ in range(min(k, len(queue)))])
    assert [s.tokens for s in seqs] == [s.tokens for s in alone]


def test_prompts_that_arrive_together_are_prefilled_before_any_of_them_decodes(tok):
    """Two prompts enter one empty batch in the same step: the second's chunk cannot ride in a decode forward,
    since the first has no token to decode yet; both then give their whole-prompt tokens."""
    model = model_of()
    prompts = [[tok.eot_token] + tok.encode("Hello world"), [tok.eot_token] + tok.encode(" ".join(PROMPTS))[:30]]

    def run(chunk: int) -> tuple[list[list[int]], Batch]:
        batch = Batch(model, 2, prefill_chunk=chunk)
        seqs = [Sequence(p, Sampling(max_tokens=6, temperature=0)) for p in prompts]
        waiting = deque(seqs)
        take = lambda k: [waiting.popleft() for _ in range(min(k, len(waiting)))]  # noqa: E731
        batch.step(take)
        assert all(len(s.tokens) == 2 for s in seqs)  # both in, each with its first token and one decoded
        while not all(s.finish_reason for s in seqs):
            batch.step(take)
        return [s.tokens for s in seqs], batch

    chunked_tokens, chunked = run(64)
    assert chunked_tokens == run(0)[0]
    assert chunked.chunks_in_decode == 0 and chunked.prefill_chunks == 2
