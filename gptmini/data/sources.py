"""Where text comes from: `wikipedia:TITLE`, `http(s)://URL`, local paths/folders/globs, `embedded:python-docs`.

Each spec resolves to a `Source`: its provenance (what was read, from where, its sha256) and a generator of
`Document`s. A document is a name plus its text as an iterator of chunks, so a file holding one line of
hundreds of MB is read in bounded memory. Chunks are cut only just before a space that sits between two
non-space characters: no tiktoken pre-tokenizer piece (cl100k, o200k, gpt2) spans such a point, so encoding
the chunks one by one gives exactly the tokens of encoding the whole document.

Downloads go to an on-disk cache keyed by content hash (`raw/<sha256>`), with a provenance record
(`raw/<sha256>.json`: source, URL, time fetched, sha256) and an index from URL to content (`urls/`), so a
second run reads the cache and needs no network.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gptmini.errors import UserError
from gptmini.files import default_cache_dir
from gptmini.files import commit, sha256_file, write_atomic
from gptmini.redact import redact

EMBEDDED = {"python-docs": "CPython's pydoc_data.topics: the Python language reference, one document per topic"}
EMBEDDED_ALIASES = {"pydoc": "python-docs"}
TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
WIKIPEDIA_API = "https://en.wikipedia.org/w/api.php"
# Wikimedia's policy asks for an identifying User-Agent with a contact: set GPTMINI_USER_AGENT to add yours.
USER_AGENT = "gptmini/0.1 (small-GPT training data prep; python-requests)"
CHUNK_CHARS = 1 << 20  # characters per chunk handed to the tokenizer
READ_BYTES = 1 << 20  # bytes per read from a file or download


class DataError(UserError):
    """Bad input to the data pipeline: the message names the value and the fix."""


@dataclass
class HttpOptions:
    timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.5  # urllib3: sleeps backoff * 2**(n-1) between tries, or what Retry-After says
    wikipedia_api: str = field(default_factory=lambda: os.environ.get("GPTMINI_WIKIPEDIA_API", WIKIPEDIA_API))
    user_agent: str = field(default_factory=lambda: os.environ.get("GPTMINI_USER_AGENT", USER_AGENT))


@dataclass
class Stats:
    """What the reader skipped or repaired; reported by `gptmini prepare` and kept in the manifest."""

    documents: int = 0
    empty_documents: int = 0  # empty or whitespace-only: skipped
    replaced_bytes: int = 0  # bytes that were not UTF-8: replaced by U+FFFD
    skipped_files: int = 0  # files in a folder with a suffix we do not read


@dataclass
class Document:
    name: str
    chunks: Iterable[str]  # concatenated, they are the document's text


@dataclass
class Source:
    spec: str
    provenance: list[dict]  # one record per input read (file, download, embedded module)
    documents: Iterator[Document]
    # reads[i]() reads the documents of input provenance[i] alone, so prepare can skip an input whose tokens
    # it already holds; None: the source is read only as a whole (`documents`).
    reads: list[Callable[[], Iterator[Document]]] | None = None

    def inputs(self) -> list[tuple[list[dict], Callable[[], Iterator[Document]]]]:
        """(provenance records, read) of each part read on its own: one per input where reads are given."""
        if self.reads is not None:
            return [([p], read) for p, read in zip(self.provenance, self.reads)]
        return [(self.provenance, lambda: self.documents)]


# Undecodable bytes are replaced and counted, not just replaced: the manifest reports how many (stats.replaced_bytes).
_REPLACED = [0]


def _count_and_replace(exc: UnicodeDecodeError) -> tuple[str, int]:
    _REPLACED[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("gptmini-count-replace", _count_and_replace)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Text: decoding, binary detection and chunking


def _split_point(buf: str, limit: int, start: int = 0) -> int:
    """The last index in (start, limit] holding a space between two non-space characters, or `limit` if none."""
    pos = buf.rfind(" ", start + 1, limit + 1)
    while pos > start:
        if pos + 1 < len(buf) and not buf[pos - 1].isspace() and not buf[pos + 1].isspace():
            return pos
        pos = buf.rfind(" ", start + 1, pos)
    return limit  # one run without such a space (e.g. a base64 blob): cut it anyway, decoding stays exact


def chunk_text(parts: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Re-cut a stream of text into chunks of at most about `chunk_chars`, at tokenizer-safe points."""
    buf = ""
    for part in parts:
        buf += part
        while len(buf) > chunk_chars:
            cut = _split_point(buf, chunk_chars)
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def split_text(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of at most about `size` characters, cut at the same tokenizer-safe points as
    `chunk_text`, without copying the rest of the text at each cut."""
    start = 0
    while len(text) - start > size:
        cut = _split_point(text, start + size, start)
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def decode_stream(f: BinaryIO, name: str, read_bytes: int = READ_BYTES) -> Iterator[str]:
    """UTF-8 text from a binary stream, block by block; undecodable bytes are replaced and counted.

    A NUL byte means binary data (the test git and grep use): the file is rejected, not tokenized.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="gptmini-count-replace")
    offset = 0
    while block := f.read(read_bytes):
        if (nul := block.find(b"\0")) >= 0:
            raise DataError(
                f"{name} looks binary (a NUL byte at offset {offset + nul}), not text; remove it from the sources "
                f"(if it is UTF-16 text, convert it to UTF-8 first)"
            )
        offset += len(block)
        if text := decoder.decode(block):
            yield text
    if tail := decoder.decode(b"", final=True):
        yield tail


def without_surrogates(text: str) -> str:
    """JSON can escape lone UTF-16 surrogates, which are not text: replace them by U+FFFD and count them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        _REPLACED[0] += len(re.findall("[\ud800-\udfff]", text))
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # as tiktoken does


def _file_text(path: Path, name: str, chunk_chars: int) -> Iterator[str]:
    with open(path, "rb") as f:
        yield from chunk_text(decode_stream(f, name), chunk_chars)


# HTTP: a session with retries, and the content-addressed cache


def http_session(opts: HttpOptions):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    retry = Retry(
        total=opts.retries,
        backoff_factor=opts.backoff,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=("GET",),
        respect_retry_after_header=True,
        raise_on_status=False,  # the last 429/5xx response comes back; we raise with its status below
    )
    session = requests.Session()
    session.headers["User-Agent"] = opts.user_agent
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass
class Cache:
    root: Path

    def blob(self, sha256: str) -> Path:
        return self.root / "raw" / sha256

    def _url_record(self, url: str) -> Path:
        return self.root / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()}.json"

    def lookup(self, url: str) -> dict | None:
        """The provenance of a cached download of `url`, if its blob is still there and intact."""
        rec = self._url_record(url)
        if not rec.exists():
            return None
        prov = json.loads(rec.read_text())
        blob = self.blob(prov["sha256"])
        if not blob.exists() or sha256_file(blob) != prov["sha256"]:
            return None
        return prov

    def remember(self, prov: dict) -> None:
        for path in (self._url_record(prov["url"]), self.blob(prov["sha256"]).with_suffix(".json")):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(prov, indent=1))

    def download(self, url: str, source: str, opts: HttpOptions) -> dict:
        """GET `url` (retrying 429/5xx), stream it into the cache by sha256, and return its provenance."""
        import requests

        (self.root / "raw").mkdir(parents=True, exist_ok=True)
        tries = opts.retries + 1
        try:
            with http_session(opts) as session, session.get(url, timeout=opts.timeout, stream=True) as resp:
                if resp.status_code == 404 and source.startswith("wikipedia:"):
                    raise DataError(f"{url} answered 404; check --wikipedia-api / GPTMINI_WIKIPEDIA_API")
                if resp.status_code >= 400:
                    raise DataError(
                        f"{redact(url)} answered HTTP {resp.status_code} {resp.reason} (after up to {tries} tries "
                        f"for 429/5xx); check the URL, or retry later"
                    )
                h = hashlib.sha256()
                fd, tmp = tempfile.mkstemp(dir=self.root / "raw", prefix=".download.", suffix=".tmp")
                try:
                    with os.fdopen(fd, "wb") as f:
                        for block in resp.iter_content(READ_BYTES):
                            h.update(block)
                            f.write(block)
                    sha = h.hexdigest()
                    commit(tmp, self.blob(sha))
                except BaseException:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                    raise
                final_url = resp.url
        except requests.exceptions.RequestException as exc:
            raise DataError(redact(
                f"could not fetch {url} after {tries} tries: {type(exc).__name__}: {str(exc)[:200]}; "
                f"check the network (no internet here? use a local file or embedded:python-docs), "
                f"or raise --retries/--timeout"
            )) from exc
        return {
            "source": source,
            "url": url,
            "final_url": final_url,
            "fetched_at": utc_now(),
            "sha256": sha,
            "bytes": self.blob(sha).stat().st_size,
        }

    def fetch(self, url: str, source: str, opts: HttpOptions, refresh: bool = False) -> dict:
        """The cached copy of `url` if there is one (unless `refresh`), else a download. Not yet remembered."""
        prov = None if refresh else self.lookup(url)
        return prov if prov is not None else self.download(url, source, opts)


# The sources


def wikipedia_url(title: str, api: str) -> str:
    query = {
        "action": "query",
        "prop": "extracts",
        "explaintext": "1",
        "redirects": "1",
        "format": "json",
        "formatversion": "2",
        "titles": title,
    }
    return f"{api}?{urllib.parse.urlencode(query)}"


def wikipedia_source(spec: str, title: str, cache: Cache, opts: HttpOptions, refresh: bool, chunk_chars: int) -> Source:
    if not title.strip():
        raise DataError(f"{spec!r} names no article; write wikipedia:TITLE, e.g. wikipedia:Transformer_(deep_learning)")
    title = title.replace("_", " ")
    url = wikipedia_url(title, opts.wikipedia_api)
    prov = cache.fetch(url, spec, opts, refresh)
    try:
        reply = json.loads(cache.blob(prov["sha256"]).read_bytes())
        page = reply["query"]["pages"][0]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise DataError(f"{url} did not answer like the MediaWiki API ({exc!r}); check --wikipedia-api") from exc
    if page.get("missing") or page.get("invalid"):
        why = page.get("invalidreason", "no such page")
        raise DataError(
            f"Wikipedia has no article titled {title!r} ({why}) at {opts.wikipedia_api}; check the spelling and "
            f"capitalisation, e.g. wikipedia:Python_(programming_language)"
        )
    cache.remember(prov)
    redirects = reply["query"].get("redirects", [])
    prov = {**prov, "title": page["title"], "pageid": page.get("pageid"), "redirected_from": [r["from"] for r in redirects]}
    doc = Document(f"wikipedia:{page['title']}", chunk_text([page.get("extract", "")], chunk_chars))
    return Source(spec, [prov], iter([doc]))


def url_source(spec: str, cache: Cache, opts: HttpOptions, refresh: bool, chunk_chars: int) -> Source:
    prov = cache.fetch(spec, spec, opts, refresh)
    blob = cache.blob(prov["sha256"])

    def documents() -> Iterator[Document]:
        # Check binary-ness before remembering the URL, so a rejected download is not cached as text.
        with open(blob, "rb") as f:
            next(iter(decode_stream(f, spec)), None)
        cache.remember(prov)
        yield Document(spec, _file_text(blob, spec, chunk_chars))

    return Source(spec, [prov], documents())


def embedded_source(spec: str, name: str, chunk_chars: int) -> Source:
    name = EMBEDDED_ALIASES.get(name, name)
    if name not in EMBEDDED:
        raise DataError(f"unknown embedded corpus {spec!r}; choose one of: {', '.join('embedded:' + n for n in EMBEDDED)}")
    from pydoc_data import topics

    keys = sorted(topics.topics)
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode() + b"\0" + topics.topics[key].encode() + b"\0")
    prov = {
        "source": spec,
        "url": f"python:pydoc_data.topics (Python {sys.version.split()[0]})",
        "fetched_at": None,
        "sha256": h.hexdigest(),
        "bytes": sum(len(topics.topics[k].encode()) for k in keys),
        "documents": len(keys),
        "description": EMBEDDED[name],
    }
    docs = (Document(f"embedded:{name}/{k}", chunk_text([topics.topics[k]], chunk_chars)) for k in keys)
    return Source(spec, [prov], docs)


def _jsonl_documents(path: Path, text_field: str, chunk_chars: int) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8", "gptmini-count-replace"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix or remove that line") from exc
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(
                    f"{path}:{lineno} has no {text_field!r} field; give each line a {text_field!r} string "
                    f"or pass --text-field NAME"
                )
            text = record[text_field]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not a string")
            yield Document(f"{path}:{lineno}", chunk_text([without_surrogates(text)], chunk_chars))


def _parquet_documents(path: Path, text_field: str, chunk_chars: int) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable Parquet file ({exc}); remove it or re-export it") from exc
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); pass --text-field NAME")
    typ = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(f"{path}: column {text_field!r} is {typ}, not a string column; pass --text-field NAME")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield Document(f"{path}#{row}", chunk_text([text or ""], chunk_chars))
            row += 1


def _expand_local(spec: str, stats: Stats) -> list[Path]:
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"the glob {spec!r} matched no files; check the pattern (quote it so the shell keeps it)")
        return files
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        files = [p for p in found if p.suffix.lower() in SUFFIXES]
        stats.skipped_files += len(found) - len(files)
        if not files:
            raise DataError(f"the folder {spec!r} holds no {'/'.join(SUFFIXES)} files; add text files or name them")
        return files
    raise DataError(f"no such file or folder: {spec!r}")


def local_source(spec: str, text_field: str, chunk_chars: int, stats: Stats) -> Source:
    # Absolute paths name the documents: a document's name is its identity, which decides its chunks' split.
    files = [Path(os.path.abspath(p)) for p in _expand_local(spec, stats)]
    prov = [
        {"source": spec, "path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files
    ]

    def file_documents(p: Path) -> Iterator[Document]:
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_documents(p, text_field, chunk_chars)
        elif suffix == ".parquet":
            yield from _parquet_documents(p, text_field, chunk_chars)
        else:
            yield Document(str(p), _file_text(p, str(p), chunk_chars))

    def documents() -> Iterator[Document]:
        for p in files:
            yield from file_documents(p)

    return Source(spec, prov, documents(), [lambda p=p: file_documents(p) for p in files])


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def open_source(
    spec: str,
    *,
    cache: Cache | None = None,
    http: HttpOptions | None = None,
    refresh: bool = False,
    text_field: str = "text",
    chunk_chars: int = CHUNK_CHARS,
    stats: Stats | None = None,
) -> Source:
    """Resolve one source spec. Downloads happen here; documents are read lazily."""
    cache = cache or Cache(default_cache_dir())
    http = http or HttpOptions()
    stats = stats if stats is not None else Stats()
    if spec.startswith("wikipedia:"):
        return wikipedia_source(spec, spec[len("wikipedia:") :], cache, http, refresh, chunk_chars)
    if spec.startswith(("http://", "https://")):
        return url_source(spec, cache, http, refresh, chunk_chars)
    if spec.startswith("embedded:"):
        return embedded_source(spec, spec[len("embedded:") :], chunk_chars)
    scheme = _SCHEME.match(spec)
    if scheme and not os.path.exists(spec) and not glob.has_magic(spec):
        raise DataError(
            f"unknown source scheme {scheme.group(1)!r} in {spec!r}; use wikipedia:TITLE, http(s)://URL, "
            f"embedded:python-docs, or a local file, folder or glob"
        )
    return local_source(spec, text_field, chunk_chars, stats)


def nonempty_documents(docs: Iterable[Document], stats: Stats) -> Iterator[tuple[str, Iterator[str]]]:
    """(name, chunks) of each document with some non-space text; empty ones are skipped and counted.

    Leading whitespace-only chunks are held back (not dropped) until the document shows text.
    """
    for doc in docs:
        chunks = iter(doc.chunks)
        held = []
        for chunk in chunks:
            held.append(chunk)
            if not chunk.isspace():
                break
        if not held or held[-1].isspace():
            stats.empty_documents += 1
            continue
        stats.documents += 1
        yield doc.name, _chain(held, chunks)


def _chain(first: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from first
    yield from rest


def replaced_bytes() -> int:
    return _REPLACED[0]
