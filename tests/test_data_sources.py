"""Sources: Wikipedia through a MediaWiki-shaped server on 127.0.0.1, URLs, local files, the cache, bad input."""
from __future__ import annotations

import json
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptmini.cli.prepare import main as prepare_main
from gptmini.data.loader import TokenShards
from gptmini.data.sources import (
    Cache,
    DataError,
    HttpOptions,
    Stats,
    chunk_text,
    nonempty_documents,
    open_source,
    replaced_bytes,
)
from gptmini.tokenizer import get_tokenizer

ARTICLE = "Generative pre-trained transformers are language models.\n\n== History ==\nThey began in 2018. Ünïcödé ✓."
FLAKY = "Retried article text, served after one 429."


class Wiki(BaseHTTPRequestHandler):
    """MediaWiki's api.php (action=query&prop=extracts, formatversion=2), plus plain URLs."""

    hits: dict[str, int] = {}
    agents: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        Wiki.agents.append(self.headers.get("User-Agent", ""))
        if url.path == "/w/api.php":
            title = urllib.parse.parse_qs(url.query)["titles"][0]
            Wiki.hits[title] = Wiki.hits.get(title, 0) + 1
            if title == "Flaky" and Wiki.hits[title] == 1:
                return self._send(429, b"slow down", {"Retry-After": "0"})
            if title == "Always busy":
                return self._send(503, b"busy")
            if title == "GPT":  # a redirect, as MediaWiki reports it with redirects=1
                query = {"redirects": [{"from": "GPT", "to": "Generative pre-trained transformer"}],
                         "pages": [{"pageid": 7, "ns": 0, "title": "Generative pre-trained transformer", "extract": ARTICLE}]}
            elif title == "Flaky":
                query = {"pages": [{"pageid": 8, "ns": 0, "title": "Flaky", "extract": FLAKY}]}
            else:
                query = {"pages": [{"ns": 0, "title": title, "missing": True}]}
            return self._send(200, json.dumps({"batchcomplete": True, "query": query}).encode(),
                              {"Content-Type": "application/json"})
        Wiki.hits[url.path] = Wiki.hits.get(url.path, 0) + 1
        if url.path == "/plain.txt":
            return self._send(200, "plain text over http\n".encode(), {"Content-Type": "text/plain"})
        if url.path == "/image.png":
            return self._send(200, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(64), {"Content-Type": "image/png"})
        return self._send(404, b"not found")


@pytest.fixture(scope="module")
def wiki_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Wiki)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(wiki_server):
    Wiki.hits, Wiki.agents = {}, []
    return wiki_server


def http(base: str, retries: int = 2) -> HttpOptions:
    return HttpOptions(timeout=5, retries=retries, backoff=0.01, wikipedia_api=f"{base}/w/api.php")


def read_all(source) -> list[tuple[str, str]]:
    return [(d.name, "".join(d.chunks)) for d in source.documents]


def test_wikipedia_retries_a_429_then_reads_the_200(server, tmp_path):
    src = open_source("wikipedia:Flaky", cache=Cache(tmp_path), http=http(server))
    assert read_all(src) == [("wikipedia:Flaky", FLAKY)]
    assert Wiki.hits["Flaky"] == 2
    assert all(a.startswith("gptmini/") for a in Wiki.agents)


def test_wikipedia_follows_redirects_and_records_provenance(server, tmp_path):
    cache = Cache(tmp_path)
    src = open_source("wikipedia:GPT", cache=cache, http=http(server))
    assert read_all(src) == [("wikipedia:Generative pre-trained transformer", ARTICLE)]
    prov = src.provenance[0]
    assert prov["title"] == "Generative pre-trained transformer" and prov["redirected_from"] == ["GPT"]
    assert prov["url"].startswith(f"{server}/w/api.php?") and "titles=GPT" in prov["url"]
    assert prov["fetched_at"].endswith("Z")
    blob = cache.blob(prov["sha256"])  # stored by content hash, with its provenance beside it
    assert blob.exists() and json.loads(blob.with_suffix(".json").read_text())["sha256"] == prov["sha256"]


def test_cached_download_needs_no_network_the_second_time(server, tmp_path):
    first = open_source("wikipedia:GPT", cache=Cache(tmp_path), http=http(server)).provenance[0]
    again = open_source("wikipedia:GPT", cache=Cache(tmp_path), http=http(server)).provenance[0]
    assert Wiki.hits["GPT"] == 1 and again == first
    open_source("wikipedia:GPT", cache=Cache(tmp_path), http=http(server), refresh=True)
    assert Wiki.hits["GPT"] == 2


def test_missing_wikipedia_title_says_so(server, tmp_path):
    with pytest.raises(DataError, match=r"Wikipedia has no article titled 'No such page zz' .*check the spelling"):
        open_source("wikipedia:No_such_page_zz", cache=Cache(tmp_path), http=http(server))
    # a missing page is not remembered: the next run asks again
    with pytest.raises(DataError):
        open_source("wikipedia:No_such_page_zz", cache=Cache(tmp_path), http=http(server))
    assert Wiki.hits["No such page zz"] == 2


def test_server_errors_give_a_clear_error_after_the_retries(server, tmp_path):
    with pytest.raises(DataError, match=r"answered HTTP 503 .*after up to 3 tries"):
        open_source("wikipedia:Always_busy", cache=Cache(tmp_path), http=http(server, retries=2))
    assert Wiki.hits["Always busy"] == 3


def test_unreachable_network_gives_a_clear_error_after_the_retries(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = HttpOptions(timeout=2, retries=2, backoff=0.01, wikipedia_api=f"http://127.0.0.1:{port}/w/api.php")
    with pytest.raises(DataError, match=r"could not fetch http://127\.0\.0\.1:\d+/w/api\.php\?.* after 3 tries: .*check the network"):
        open_source("wikipedia:Anything", cache=Cache(tmp_path), http=opts)


def test_http_url_of_text(server, tmp_path):
    src = open_source(f"{server}/plain.txt", cache=Cache(tmp_path), http=http(server))
    assert read_all(src) == [(f"{server}/plain.txt", "plain text over http\n")]
    assert src.provenance[0]["bytes"] == len("plain text over http\n")


def test_http_url_of_binary_is_rejected_naming_it(server, tmp_path):
    src = open_source(f"{server}/image.png", cache=Cache(tmp_path), http=http(server))
    with pytest.raises(DataError, match=rf"{server}/image.png looks binary \(a NUL byte at offset 8\)"):
        read_all(src)


def test_http_404_is_a_clear_error(server, tmp_path):
    with pytest.raises(DataError, match=r"/nothing.txt answered HTTP 404"):
        open_source(f"{server}/nothing.txt", cache=Cache(tmp_path), http=http(server))


def test_wikipedia_title_prepares_into_shards_that_decode_to_the_article(server, tmp_path):
    argv = ["wikipedia:GPT", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--wikipedia-api", f"{server}/w/api.php", "--workers", "1", "--val-fraction", "0"]
    assert prepare_main(argv) == 0
    shards = TokenShards.open(tmp_path / "out", "train")
    tok = get_tokenizer()
    assert tok.decode(shards[0 : len(shards)]) == ARTICLE + "<|endoftext|>"
    manifest = shards.manifest
    assert manifest["sources"][0]["inputs"][0]["title"] == "Generative pre-trained transformer"
    assert prepare_main(argv) == 0 and Wiki.hits["GPT"] == 1  # second run: from the cache, and a no-op


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("s3://bucket/corpus.txt", r"unknown source scheme 's3' in 's3://bucket/corpus.txt'; use wikipedia:TITLE"),
        ("embedded:shakespeare", r"unknown embedded corpus 'embedded:shakespeare'; choose one of: embedded:python-docs"),
        ("wikipedia:", r"names no article"),
    ],
)
def test_bad_specs_name_the_value(spec, message, tmp_path):
    with pytest.raises(DataError, match=message):
        open_source(spec, cache=Cache(tmp_path))


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match=r"no such file or folder: '.*nope\.txt'"):
        open_source(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match=r"the glob '.*\*\.md' matched no files"):
        open_source(str(tmp_path / "*.md"))


def test_local_folder_reads_txt_md_jsonl_parquet_and_skips_other_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# beta\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma one"}) + "\n\n" + json.dumps({"text": "gamma two"}) + "\n")
    pq.write_table(pa.table({"id": [1, 2], "text": ["delta one", "delta two"]}), tmp_path / "d.parquet")
    (tmp_path / "e.bin").write_bytes(b"\0\1\2")
    stats = Stats()
    docs = read_all(open_source(str(tmp_path), stats=stats))
    assert [t for _, t in docs] == ["alpha text", "gamma one", "gamma two", "delta one", "delta two", "# beta\n"]
    assert stats.skipped_files == 1
    glob_docs = read_all(open_source(str(tmp_path / "**" / "*.md")))
    assert [t for _, t in glob_docs] == ["# beta\n"]


def test_jsonl_without_the_text_field_names_the_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2 has no 'text' field; .*--text-field NAME"):
        read_all(open_source(str(tmp_path / "x.jsonl")))
    (tmp_path / "y.jsonl").write_text('{"body": "yes"}\n')
    assert read_all(open_source(str(tmp_path / "y.jsonl"), text_field="body"))[0][1] == "yes"


def test_parquet_without_the_text_column_lists_the_columns(tmp_path):
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: id, body\)"):
        read_all(open_source(str(tmp_path / "t.parquet")))


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café crème, naïve".encode("latin-1"))
    before = replaced_bytes()
    [(_, text)] = read_all(open_source(str(tmp_path / "latin1.txt")))
    assert text == "caf\ufffd cr\ufffdme, na\ufffdve"
    assert replaced_bytes() - before == 3


def test_binary_file_is_rejected_naming_it(tmp_path):
    (tmp_path / "model.txt").write_bytes(b"looks like text" + bytes(10) + b"\xff")
    with pytest.raises(DataError, match=r"model\.txt looks binary \(a NUL byte at offset 15\)"):
        read_all(open_source(str(tmp_path / "model.txt")))


def test_empty_and_whitespace_documents_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text(" \n\t \n")
    (tmp_path / "c.txt").write_text("  real text")
    stats = Stats()
    docs = [(n, "".join(c)) for n, c in nonempty_documents(open_source(str(tmp_path)).documents, stats)]
    assert [t for _, t in docs] == ["  real text"]
    assert (stats.documents, stats.empty_documents) == (1, 2)


def test_chunked_encoding_equals_encoding_the_whole_text():
    rng = np.random.default_rng(0)
    words = ["the", "  ", "don't", "123456", "\n\n", "naïve", "ümlaut", "😀", "x=1;", " \t", "URL:http://a.b/c", "'s"]
    text = "".join(rng.choice(words) + (" " if rng.random() < 0.7 else "") for _ in range(20000))
    chunks = list(chunk_text([text[i : i + 777] for i in range(0, len(text), 777)], chunk_chars=1000))
    assert "".join(chunks) == text and len(chunks) > 50 and max(map(len, chunks)) <= 1000
    for name in ("cl100k_base",):
        enc = get_tokenizer(name).enc
        assert [t for c in chunks for t in enc.encode_ordinary(c)] == enc.encode_ordinary(text)


def test_cache_provenance_file_is_valid_json(server, tmp_path):
    cache = Cache(tmp_path)
    prov = open_source(f"{server}/plain.txt", cache=cache, http=http(server)).provenance[0]
    list(open_source(f"{server}/plain.txt", cache=cache, http=http(server)).documents)
    record = json.loads(Path(cache.blob(prov["sha256"])).with_suffix(".json").read_text())
    assert set(record) >= {"source", "url", "fetched_at", "sha256", "bytes"}


def test_jsonl_bad_bytes_and_lone_surrogates_are_replaced_and_counted(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "half \\ud800 pair"}\n')
    before = replaced_bytes()
    assert [t for _, t in read_all(open_source(str(tmp_path / "x.jsonl")))] == ["caf\ufffd", "half \ufffd pair"]
    assert replaced_bytes() - before == 2
