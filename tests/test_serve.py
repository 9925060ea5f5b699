"""`gptmini serve` as users run it: a real uvicorn process on 127.0.0.1, called through the `openai` client
(and raw HTTP where a client would never send such a request).

The model is the tiny preset with sharp weights (tests/model_helpers.py), so mixed-up cache rows or positions
change the greedy text; the references are `gptmini generate`'s tokens for the same prompt.
"""
from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from gptmini.config import model_preset
from gptmini.weights import load_model
from gptmini.data.prepare import read_manifest
from gptmini.evaluate import split_stream, token_nats
from gptmini.tokenizer import get_tokenizer
from gptmini.generate import generate_text
from gptmini.weights import save_pretrained
from model_helpers import sharp_model
from serve_helpers import BIN, Server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

API_KEY = "test-key-0123456789"
LIMIT = 400_000  # --max-body-bytes
PROMPTS = ["Hello world", "The Python interpreter", "a", "import os\nimport sys\n", "def f(x):", "class A:",
           "x = 1", "while True:", "for i in range(10):", "# comment", "print(", "return", "if __name__",
           "lambda", "yield from", "async def main():"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "weights"
    save_pretrained(sharp_model(model_preset("tiny")), folder)
    return folder


@pytest.fixture(scope="module")
def reference(weights):
    model, tok = load_model(weights)
    return lambda prompt, n: generate_text(model, tok, prompt, max_new_tokens=n, temperature=0)


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    """4 batch slots and a queue of 12: 16 concurrent requests all fit, most of them waiting at first."""
    s = Server("--checkpoint", str(weights), "--max-batch", "4", "--max-queue", "12", "--max-tokens", "100",
               "--max-body-bytes", str(LIMIT), api_key=API_KEY, log=tmp_path_factory.mktemp("log") / "serve.log")
    yield s
    s.stop()


def test_completions_chat_and_models_answer_in_openai_shape(server, reference):
    client = server.openai()
    assert [m.id for m in client.models.list().data] == ["gptmini"]

    done = client.completions.create(model="gptmini", prompt=["Hello world", "def f(x):"], max_tokens=12,
                                     temperature=0)
    assert done.model == "gptmini" and [c.index for c in done.choices] == [0, 1]
    assert [c.text for c in done.choices] == [reference("Hello world", 12), reference("def f(x):", 12)]
    assert all(c.finish_reason in ("stop", "length") for c in done.choices)
    assert done.usage.prompt_tokens == 2 * 1 + 2 + 4  # end-of-text + each prompt's tokens
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    ignore = {"ignore_eos": True}
    full = client.completions.create(model="gptmini", prompt="x", max_tokens=9, temperature=0, extra_body=ignore)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 9

    seeded = client.completions.create(model="gptmini", prompt="x", max_tokens=10, temperature=1.0, seed=5, n=2)
    again = client.completions.create(model="gptmini", prompt="x", max_tokens=10, temperature=1.0, seed=5, n=2)
    assert [c.text for c in seeded.choices] == [c.text for c in again.choices]

    chat = client.chat.completions.create(model="gptmini", messages=[{"role": "system", "content": "Be brief."},
                                                                     {"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    expected = reference("Be brief.\n\nUser: Hi\nAssistant:", 8).split("\nUser:")[0].lstrip()
    assert chat.choices[0].message.content == expected


def test_streams_are_server_sent_events_that_add_up_to_the_whole_answer(server, reference):
    client = server.openai()
    chunks = list(client.completions.create(model="gptmini", prompt="The Python interpreter", max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference("The Python interpreter", 20)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens >= 1

    parts = list(client.chat.completions.create(model="gptmini", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert all(p.object == "chat.completion.chunk" for p in parts)

    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=30,
                      json={"prompt": "x", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_sixteen_concurrent_requests_are_each_answered_with_their_own_text(server, reference):
    client = server.openai()
    lengths = [random.Random(i).randint(1, 40) for i in range(len(PROMPTS))]

    def ask(i: int):
        if i % 4 == 3:  # some stream, some sample with a seed, the rest are greedy
            chunks = client.completions.create(model="gptmini", prompt=PROMPTS[i], max_tokens=lengths[i],
                                               temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        if i % 4 == 2:
            return client.completions.create(model="gptmini", prompt=PROMPTS[i], max_tokens=lengths[i],
                                             temperature=0.9, seed=i).choices[0].text
        return client.completions.create(model="gptmini", prompt=PROMPTS[i], max_tokens=lengths[i],
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    seeded_alone = {i: ask(i) for i in range(16) if i % 4 == 2}  # the same seeded request, now on its own
    for i, answer in enumerate(answers):
        if i % 4 == 2:
            assert answer == seeded_alone[i], f"request {i} changed with the batch around it"
        else:
            assert answer == reference(PROMPTS[i], lengths[i]), f"request {i} ({PROMPTS[i]!r}) was mixed up"
    server.wait_for(lambda: server.metric("gptmini_batch_occupancy") == 0, what="slots to empty")


def test_greedy_answer_is_what_gptmini_generate_prints(server, weights):
    cli = subprocess.run([str(BIN / "gptmini"), "generate", "--checkpoint", str(weights), "--prompt", "class A:",
                          "--max-new-tokens", "15", "--temperature", "0"], capture_output=True, text=True, check=True)
    answer = server.openai().completions.create(model="gptmini", prompt="class A:", max_tokens=15, temperature=0)
    assert cli.stdout == "class A:" + answer.choices[0].text + "\n"


def test_logprobs_and_echo_are_the_models_own_in_openai_shapes(server, weights):
    """Completions: echo's prompt log-probabilities are `gptmini eval`'s per-token nats, negated; each new
    greedy token is its position's most likely one. Chat: content[] with token, logprob, bytes, top_logprobs."""
    model, tok = load_model(weights)
    client = server.openai()
    ids = tok.encode("def f(x):\n    return x")
    done = client.completions.create(model="gptmini", prompt="def f(x):\n    return x", max_tokens=3,
                                     temperature=0, logprobs=2, echo=True, extra_body={"ignore_eos": True})
    c = done.choices[0]
    lp = c.logprobs
    assert c.text.startswith("def f(x):\n    return x") and len(lp.tokens) == len(ids) + 3
    assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    x = torch.tensor([[tok.eot_token] + ids])
    nats = token_nats(model, x[:, :-1], x[:, 1:])[0].tolist()
    assert lp.token_logprobs[: len(ids)] == pytest.approx([-n for n in nats], abs=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    for token, logprob, top in list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))[len(ids):]:
        assert top[token] == logprob == max(top.values())  # greedy: the most likely token

    by_ids = client.completions.create(model="gptmini", prompt=[tok.eot_token] + ids, max_tokens=1, temperature=0,
                                       logprobs=0, echo=True)
    lp_ids = by_ids.choices[0].logprobs
    assert lp_ids.token_logprobs[0] is None and lp_ids.top_logprobs[0] is None  # no context before it
    assert lp_ids.token_logprobs[1:-1] == pytest.approx(lp.token_logprobs[: len(ids)], abs=1e-5)

    chat = client.chat.completions.create(model="gptmini", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert 1 <= len(content) <= 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob and bytes(t.bytes).decode() == t.token for t in content)


CLOZE_TASK = """task: gptmini_val_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def cloze_pack(folder, small_shards, tok, docs: int = 6) -> list[dict]:
    """Last-word cloze from the val split's pieces: each piece's first line of 6 to 30 words, its last word
    the target."""
    theirs = get_tokenizer(read_manifest(small_shards)["tokenizer"], small_shards)
    stream, _ = split_stream(small_shards, theirs)  # the shards' own tokens
    text = theirs.decode(stream[:20000].tolist())
    lines = [line.split() for line in text.split("\n") if 6 <= len(line.split()) <= 30 and "<|" not in line]
    rows = [{"context": " ".join(words[:-1]), "target": " " + words[-1]} for words in lines[:docs]]
    (folder / "cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "cloze.yaml").write_text(CLOZE_TASK.format(data=folder / "cloze.jsonl"))
    return rows


def test_lm_eval_harness_scores_a_val_cloze_pack_with_gptmini_evals_per_token_values(server, weights, small_shards,
                                                                                    tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` model (prompt token ids, echo, logprobs) against this
    server: each document's log-likelihood is minus the sum of `evaluate.token_nats` over the target's
    tokens, to 1e-3 nats."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from gptmini.hf import hf_tokenizer_config, hf_tokenizer_json

    model, tok = load_model(weights)
    (tmp_path / "hf").mkdir()  # lm-eval tokenizes with transformers: export-hf's tokenizer files
    (tmp_path / "hf" / "tokenizer.json").write_text(hf_tokenizer_json(tok))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(tok, 128)))
    rows = cloze_pack(tmp_path, small_shards, tok)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["gptmini_val_cloze"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        model_args={"model": "gptmini", "base_url": server.url + "/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": str(tmp_path / "hf"), "add_bos_token": True, "max_retries": 1},
        bootstrap_iters=0)
    samples = sorted(out["samples"]["gptmini_val_cloze"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows) and 0.0 <= out["results"]["gptmini_val_cloze"]["acc,none"] <= 1.0
    for row, sample in zip(rows, samples):
        context = [tok.eot_token] + tok.encode(row["context"])  # add_bos_token: our prompt framing
        x = torch.tensor([[tok.eot_token] + tok.encode(row["context"] + row["target"])])
        with torch.no_grad():
            nats = token_nats(model, x[:, :-1], x[:, 1:])[0, len(context) - 1 :]
        assert sample["resps"][0][0][0] == pytest.approx(-float(nats.sum()), abs=1e-3)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = server.metric("gptmini_completion_tokens_total")
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=30,
                      json={"prompt": "x", "max_tokens": 100, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line)
        assert server.metric("gptmini_batch_occupancy") == 1
    server.wait_for(lambda: server.metric("gptmini_batch_occupancy") == 0, timeout=10, what="the slot to be freed")
    generated = server.metric("gptmini_completion_tokens_total") - before
    assert generated < 100, "the generation ran on after its client left"


@dataclass
class Raw:
    """A body sent as these bytes, under this Content-Type (None: no header)."""
    content: bytes | Callable[[], Iterator[bytes]]
    content_type: str | None = "application/json"


def chunked(n: int) -> Callable[[], Iterator[bytes]]:
    """A JSON body of about n bytes sent without Content-Length (Transfer-Encoding: chunked)."""
    return lambda: iter([b'{"prompt": "', *[b"x" * 10_000] * (n // 10_000), b'"}'])


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
X = {"prompt": "x"}
USER = {"messages": [{"role": "user", "content": "Hi"}]}

# The error contract: every way a body fails to parse, and each field's range, on each endpoint. Each row is
# (path, body, status, param, what the message must say).
BAD = [
    # Retrieval (this server has no index; tests/test_rag.py starts one that has)
    (COMPLETIONS, {"prompt": "x", "retrieval": {"k": 0}}, 400, "retrieval.k", "retrieval.k=0 is out of range; use 1 to 50"),
    (COMPLETIONS, {"prompt": "x", "retrieval": {"k": 51}}, 400, "retrieval.k", "use 1 to 50"),
    (COMPLETIONS, {"prompt": "x", "retrieval": True}, 400, "retrieval", "serves without retrieval"),
    (COMPLETIONS, {"prompt": "x", "retrieval": {"stride": 0}}, 400, "retrieval.stride",
     "retrieval.stride=0 is out of range; use 1 to 4096, or leave it out to retrieve once"),
    (COMPLETIONS, {"prompt": "x", "retrieval": {"k": 1, "stride": 4097}}, 400, "retrieval.stride", "use 1 to 4096"),
    (CHAT, {**USER, "retrieval": {"stride": "8"}}, 400, "retrieval.stride", "retrieval.stride='8' is out of range"),
    (COMPLETIONS, {"prompt": "x", "retrieval": {"stride": 8}, "logprobs": 1}, 400, "retrieval.stride",
     "cannot be combined with logprobs"),
    (COMPLETIONS, {"prompt": "x", "retrieval": {"k": 1, "top": 2}}, 400, "retrieval",
     "retrieval.top is not a retrieval option; use k and stride"),
    ("/v1/vector_stores/vs_nope/search", {"query": "x"}, 404, "vector_store_id", "no retrieval index"),
    ("/v1/vector_stores/vs_nope/search", {"query": ""}, 400, "query", "query must be a non-empty string"),
    ("/v1/vector_stores/vs_nope/search", {"query": "x", "max_num_results": 51}, 400, "max_num_results",
     "max_num_results=51 is out of range; use 1 to 50"),
    # The body
    (COMPLETIONS, Raw(b"{not json"), 400, None, "not valid JSON"),
    (COMPLETIONS, Raw(b"[1, 2]"), 400, None, "must be a JSON object"),
    (COMPLETIONS, Raw(b"null"), 400, None, "must be a JSON object"),
    (COMPLETIONS, Raw(b""), 400, None, "must be a JSON object"),
    (COMPLETIONS, Raw(b'{"prompt": "x"}', "text/plain"), 415, None, "Content-Type: application/json"),
    (COMPLETIONS, Raw(b'{"prompt": "x"}', None), 415, None, "Content-Type: application/json"),
    (COMPLETIONS, Raw(b"[" * 100_000 + b"]" * 100_000), 400, None, "nested too deeply"),
    (CHAT, Raw(b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"), 400, None, "nested too deeply"),
    (COMPLETIONS, Raw(b'{"prompt": "caf\xe9"}'), 400, None, "not valid UTF-8 (byte 0xe9 at offset 15)"),
    (COMPLETIONS, Raw(b'{"prompt": "\\ud800"}'), 400, "prompt", "lone UTF-16 surrogate"),
    (COMPLETIONS, Raw(b'{"prompt": "' + b"x" * LIMIT + b'"}'), 413, None, f"limit of {LIMIT} bytes"),
    (COMPLETIONS, Raw(chunked(LIMIT + 100_000)), 413, None, f"limit of {LIMIT} bytes"),
    (COMPLETIONS, {"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "unrecognized request argument 'frobnicate'"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs", "logprobs: Input should be less than or equal to 20"),
    (COMPLETIONS, {"prompt": "x", "echo": True, "stream": True}, 400, "stream", "leave out stream"),
    (COMPLETIONS, {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ("/v1/embeddings", X, 404, None, "no such endpoint: POST /v1/embeddings"),
    # prompt
    (COMPLETIONS, {"max_tokens": 5}, 400, "prompt", "missing required field 'prompt'"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt", "prompt must be a string"),
    (COMPLETIONS, {"prompt": [1, -2, 3]}, 400, "prompt", "list of token ids"),
    (COMPLETIONS, {"prompt": [[1, 2], []]}, 400, "prompt", "list of token ids"),
    (COMPLETIONS, {"prompt": [5, 200000]}, 400, "prompt", "token id 200000 is not in the model's vocabulary"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", "prompt must be a string, a list of strings"),
    (COMPLETIONS, {"prompt": ["a", None]}, 400, "prompt", "prompt must be a string, a list of strings"),
    (COMPLETIONS, {"prompt": ["a"] * 13}, 400, "prompt", "at most 12 per request"),
    (COMPLETIONS, {"prompt": [""] * 100_000}, 400, "prompt", "at most 12 per request"),
    (COMPLETIONS, {"prompt": "word " * 200}, 400, "prompt", "exceeds the model's context of 128"),
    (COMPLETIONS, {"prompt": "word " * 100, "max_tokens": 50}, 400, "max_tokens", "exceeds the model's context of 128"),
    # model
    (COMPLETIONS, {"prompt": "x", "model": 5}, 400, "model", "model: Input should be a valid string"),
    (COMPLETIONS, {"prompt": "x", "model": "gpt-4"}, 404, "model", "'gpt-4' is not served here; name 'gptmini'"),
    (COMPLETIONS, {"prompt": "x", "model": "/etc/passwd"}, 404, "model", "'/etc/passwd' is not served here"),
    (COMPLETIONS, {"prompt": "x", "model": "models:/gptmini/1"}, 404, "model", "is not served here"),
    # max_tokens
    (COMPLETIONS, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "max_tokens: Input should be a valid integer"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens", "max_tokens: Input should be a valid integer"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": True}, 400, "max_tokens", "max_tokens: Input should be a valid integer"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 101}, 400, "max_tokens", "cap of 100"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 2**80}, 400, "max_tokens", "cap of 100"),
    (CHAT, {**USER, "max_completion_tokens": 0}, 400, "max_completion_tokens", "greater than or equal to 1"),
    (CHAT, {**USER, "max_completion_tokens": 101}, 400, "max_completion_tokens", "max_completion_tokens=101 is above"),
    # sampling
    (COMPLETIONS, {"prompt": "x", "temperature": -0.5}, 400, "temperature", "greater than or equal to 0"),
    (COMPLETIONS, {"prompt": "x", "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    (COMPLETIONS, Raw(b'{"prompt": "x", "temperature": NaN}'), 400, "temperature", "less than or equal to 2"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature: Input should be a valid number"),
    (COMPLETIONS, {"prompt": "x", "top_p": 0}, 400, "top_p", "top_p: Input should be greater than 0"),
    (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, 400, "top_p", "top_p: Input should be less than or equal to 1"),
    (COMPLETIONS, {"prompt": "x", "top_k": 0}, 400, "top_k", "greater than or equal to 1"),
    (COMPLETIONS, {"prompt": "x", "top_k": "5"}, 400, "top_k", "top_k: Input should be a valid integer"),
    (COMPLETIONS, {"prompt": "x", "seed": 2**80}, 400, "seed", "from -9223372036854775808 to 9223372036854775807"),
    (COMPLETIONS, {"prompt": "x", "seed": -(2**63) - 1}, 400, "seed", "signed 64-bit integer"),
    (COMPLETIONS, {"prompt": "x", "seed": 1.5}, 400, "seed", "seed: Input should be a valid integer"),
    (COMPLETIONS, {"prompt": "x", "ignore_eos": "no"}, 400, "ignore_eos", "ignore_eos: Input should be a valid boolean"),
    # n, stop, stream
    (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n", "n: Input should be greater than or equal to 1"),
    (COMPLETIONS, {"prompt": "x", "n": 9}, 400, "n", "n: Input should be less than or equal to 8"),
    (COMPLETIONS, {"prompt": "x", "n": "2"}, 400, "n", "n: Input should be a valid integer"),
    (COMPLETIONS, {"prompt": ["a", "b"], "n": 8}, 400, "prompt", "2 prompt(s) x n=8 is 16 sequences"),
    (COMPLETIONS, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    (COMPLETIONS, {"prompt": "x", "stop": ""}, 400, "stop", "non-empty string or a list of them"),
    (COMPLETIONS, {"prompt": "x", "stop": ["a", 3]}, 400, "stop", "non-empty string or a list of them"),
    (COMPLETIONS, {"prompt": "x", "stream": "yes"}, 400, "stream", "stream: Input should be a valid boolean"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": 1}}, 400, "stream_options", "include_usage"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"x": 1}}, 400, "stream_options", "Extra inputs are not permitted"),
    # messages
    (CHAT, {"max_tokens": 5}, 400, "messages", "missing required field 'messages'"),
    (CHAT, {"messages": []}, 400, "messages", "non-empty list"),
    (CHAT, {"messages": "Hi"}, 400, "messages", "non-empty list"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "messages[0].role must be"),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "must be a string"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content", "reads text only"),
    (CHAT, Raw(b'{"messages": [{"role": "user", "content": "\\udfff"}]}'), 400, "messages[0].content", "surrogate"),
]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as client:
        yield client


@pytest.mark.parametrize("path,body,status,param,names", BAD, ids=[f"{p[4:]} {str(b)[:50]}" for p, b, *_ in BAD])
def test_bad_requests_get_an_openai_error_naming_the_field_and_limit(http, path, body, status, param, names):
    if isinstance(body, Raw):
        content = body.content() if callable(body.content) else body.content
        headers = {"Content-Type": body.content_type} if body.content_type else {}
    else:
        content, headers = json.dumps(body, separators=(",", ":")), {"Content-Type": "application/json"}
    r = http.post(path, content=content, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert names in error["message"] and error["param"] == param, error


def test_the_routes_answer_wrong_methods_and_paths_in_openai_shape(http):
    wrong_method = http.get(COMPLETIONS)
    assert wrong_method.status_code == 405 and "takes POST" in wrong_method.json()["error"]["message"]
    assert http.get("/v2/models").json()["error"]["code"] == "unknown_url"


def test_the_server_stays_healthy_after_every_bad_request(server, http):
    assert http.get("/health").status_code == 200
    assert http.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert server.metric("gptmini_requests_total", 'endpoint="completions",status="500"') == 0
    assert server.metric("gptmini_requests_total", 'endpoint="chat",status="500"') == 0
    assert server.proc.poll() is None


def test_the_api_key_is_checked_as_a_bearer_token(server):
    no_key = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key-000000", max_retries=0)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="gptmini", prompt="x", max_tokens=1)
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_metrics_count_requests_tokens_and_latency(server):
    text = httpx.get(server.url + "/metrics", timeout=5).text
    for name in ("gptmini_requests_total", "gptmini_completion_tokens_total", "gptmini_request_latency_seconds_bucket",
                 "gptmini_time_to_first_token_seconds_bucket", "gptmini_inter_token_latency_seconds_bucket",
                 "gptmini_queue_depth", "gptmini_batch_occupancy", 'gptmini_served_model_info{model="gptmini"'):
        assert name in text, name
    assert server.metric("gptmini_requests_total", 'endpoint="completions",status="400"') >= 1


def test_a_bounded_soak_answers_or_refuses_every_request_and_empties_its_slots(weights, tmp_path):
    """16 clients (random lengths, some streaming and hanging up early) against 4 slots and a queue of 4, until
    24 requests were answered and one refused (however slow the machine): every request is answered or refused
    with 429 and Retry-After, none fails, and the slots empty. The server runs the int8 weights
    (`--quantize int8`), so they are soaked too."""
    server = Server("--checkpoint", str(weights), "--max-batch", "4", "--max-queue", "4", "--max-tokens", "64",
                    "--quantize", "int8", log=tmp_path / "soak.log")
    counts = {"sent": 0, "answered": 0, "refused": 0, "hung_up": 0, "other": []}
    lock = threading.Lock()
    deadline = time.monotonic() + 180

    def soaked() -> bool:
        with lock:
            return counts["answered"] >= 24 and counts["refused"] > 0

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not soaked() and time.monotonic() < deadline:
                body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 64),
                        "temperature": rng.choice([0, 0.8]), "stream": rng.random() < 0.4}
                hang_up = body["stream"] and rng.random() < 0.5
                with lock:
                    counts["sent"] += 1
                with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code == 429:
                        assert r.headers.get("retry-after") == "1"
                        outcome = "refused"
                    elif r.status_code != 200:
                        outcome = None
                        with lock:
                            counts["other"].append((r.status_code, r.read()[:200]))
                    elif hang_up:
                        next(r.iter_lines())
                        outcome = "hung_up"
                    else:
                        r.read()
                        outcome = "answered"
                if outcome:
                    with lock:
                        counts[outcome] += 1
                if outcome == "refused":
                    time.sleep(rng.uniform(0.05, 0.3))

    try:
        assert server.metric("gptmini_served_model_info", 'model="gptmini",quantize="int8",version=""') == 1
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(client, range(16)))
        server.wait_for(lambda: server.metric("gptmini_batch_occupancy") == 0
                        and server.metric("gptmini_queue_depth") == 0, timeout=15, what="the slots to empty")
        assert counts["other"] == []
        assert counts["sent"] == counts["answered"] + counts["refused"] + counts["hung_up"]
        assert counts["answered"] >= 24 and counts["refused"] > 0, counts
        assert server.metric("gptmini_requests_total", 'endpoint="completions",status="500"') == 0
    finally:
        server.stop()
