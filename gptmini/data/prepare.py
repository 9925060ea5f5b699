"""Preparing a corpus: text → tiktoken ids → uint32 Arrow IPC shards + manifest.json.

The main process reads and decodes the sources and decides each document's split; worker processes
tokenize (tiktoken releases the GIL, but one process per core also overlaps the Python-side work); the
main process writes the token stream of each split into shards of at most `shard_tokens` tokens. At most
`2 * workers` tasks are in flight, so memory stays bounded however large the input.

Output names carry their sha256 (`train-00000-<sha12>.arrow`) and `manifest.json` is replaced last, in one
rename: a reader sees the old shard set or the new one, never a mix. The manifest records `input_key`, a
hash of the inputs' sha256s and the settings; re-running with the same inputs finds it, verifies the shards
and does nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from gptmini.data.sources import (
    CHUNK_CHARS,
    Cache,
    DataError,
    HttpOptions,
    Source,
    Stats,
    default_cache_dir,
    nonempty_documents,
    open_source,
    replaced_bytes,
    utc_now,
)
from gptmini.files import commit, read_json, sha256_file, write_atomic
from gptmini.redact import redact_tree
from gptmini.tokenizer import DEFAULT_TOKENIZER, get_tokenizer

FORMAT = "gptmini-tokens/1"
SPLITS = ("train", "val")
SHARD_TOKENS = 100_000_000  # 400 MB shards, as nanoGPT's FineWeb shards
TASK_CHARS = 1 << 18  # characters per tokenization task sent to a worker
# Below this many input bytes (about a second of one core's tokenizing), spawning workers costs more than
# it saves: tokenize in this process.
INLINE_BYTES = 1 << 22


@dataclass
class PrepareConfig:
    sources: list[str]
    out: Path
    tokenizer: str = DEFAULT_TOKENIZER
    val_fraction: float = 0.05
    shard_tokens: int = SHARD_TOKENS
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    text_field: str = "text"
    chunk_chars: int = CHUNK_CHARS
    cache_dir: Path = field(default_factory=default_cache_dir)
    http: HttpOptions = field(default_factory=HttpOptions)
    refresh: bool = False  # re-download even if the cache holds the URL
    force: bool = False  # rewrite even if the manifest says the output is up to date
    inline_bytes: int = INLINE_BYTES  # inputs smaller than this are tokenized without worker processes
    report_every_s: float = 10.0  # progress lines on stderr during long runs


@dataclass
class Result:
    manifest: dict
    up_to_date: bool  # True: nothing was written
    seconds: float
    text_chars: int
    workers: int  # tokenizer processes used (1: this process)


# Tokenization: one function, run in the workers or inline


_TOKENIZER = None


def _init_worker(name: str) -> None:
    global _TOKENIZER
    _TOKENIZER = get_tokenizer(name)


def encode_task(task: list[tuple[int, str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of each split, in order: one (split, text, ends_document) piece after another."""
    enc, eot = _TOKENIZER.enc, np.array([_TOKENIZER.eot_token], dtype=np.uint32)
    parts: tuple[list, list] = ([], [])
    for split, text, ends_document in task:
        # encode_to_numpy with nothing special allowed or disallowed == encode_ordinary, minus the list.
        parts[split].append(enc.encode_to_numpy(text, disallowed_special=()))
        if ends_document:
            parts[split].append(eot)
    return tuple(np.concatenate(p) if p else np.empty(0, np.uint32) for p in parts)


def split_of(first_chunk: str, val_fraction: float) -> int:
    """0 (train) or 1 (val), from the sha256 of the document's first chunk: stable and order-free."""
    digest = hashlib.sha256(first_chunk.encode("utf-8", "surrogatepass")).digest()
    return int(int.from_bytes(digest[:8], "big") < val_fraction * 2**64)


@dataclass
class Counts:
    documents: list[int] = field(default_factory=lambda: [0, 0])
    text_chars: int = 0


def pieces(sources: list[Source], val_fraction: float, stats: Stats, counts: Counts) -> Iterator[tuple[int, str, bool]]:
    for source in sources:
        for _, chunks in nonempty_documents(source.documents, stats):
            prev = next(chunks)
            split = split_of(prev, val_fraction)
            counts.documents[split] += 1
            for chunk in chunks:
                counts.text_chars += len(prev)
                yield split, prev, False
                prev = chunk
            counts.text_chars += len(prev)
            yield split, prev, True


def tasks(stream: Iterable[tuple[int, str, bool]], task_chars: int) -> Iterator[list[tuple[int, str, bool]]]:
    task, size = [], 0
    for piece in stream:
        task.append(piece)
        size += len(piece[1])
        if size >= task_chars:
            yield task
            task, size = [], 0
    if task:
        yield task


def prefetched(items: Iterable) -> Iterator:
    """Read the next item in a helper thread while the caller works on this one: tiktoken releases the
    GIL while it encodes, so reading and decoding the next task overlaps tokenizing the current one."""
    it = iter(items)
    with ThreadPoolExecutor(1) as ex:
        pending = ex.submit(next, it, None)
        while (item := pending.result()) is not None:
            pending = ex.submit(next, it, None)
            yield item


def tokenize(task_iter: Iterable[list], name: str, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if workers <= 1:
        _init_worker(name)
        yield from map(encode_task, prefetched(task_iter))
        return
    # spawn, not fork: prepare may run inside a threaded host (a Prefect task), where fork can deadlock.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(name,)) as ex:
        pending = deque()
        for task in task_iter:
            pending.append(ex.submit(encode_task, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# Shards


class ShardWriter:
    """Appends uint32 tokens of one split; every `shard_tokens` tokens become one Arrow IPC file.

    Tokens go first to a raw scratch file; a full shard is then written as one Arrow record batch straight
    from a memory map of it, so each shard is one contiguous, mmap-able uint32 buffer and RAM stays small.
    """

    def __init__(self, out: Path, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards: list[dict] = []
        self.scratch = out / f".{split}.{os.getpid()}.raw"
        self.f = None
        self.n = 0  # tokens in the open shard
        self.total = 0  # tokens written by this writer

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.f is None:
                self.f, self.n = open(self.scratch, "wb"), 0
            take = tokens[: self.shard_tokens - self.n]
            take.tofile(self.f)
            self.n += len(take)
            self.total += len(take)
            tokens = tokens[len(take) :]
            if self.n == self.shard_tokens:
                self._finish_shard()

    def close(self) -> list[dict]:
        if self.f is not None:
            self._finish_shard()
        return self.shards

    def abort(self, keep: set[str]) -> None:
        """Remove this run's scratch file and its finished shards, except those in `keep` (the live manifest's)."""
        if self.f is not None:
            self.f.close()
        self.scratch.unlink(missing_ok=True)
        for shard in self.shards:
            if shard["file"] not in keep:
                (self.out / shard["file"]).unlink(missing_ok=True)

    def _finish_shard(self) -> None:
        import pyarrow as pa

        self.f.close()
        self.f = None
        tmp = self.out / f".{self.split}-{len(self.shards):05d}.{os.getpid()}.tmp"
        try:
            raw = pa.memory_map(str(self.scratch), "r").read_buffer()  # zero-copy view of the scratch file
            tokens = pa.Array.from_buffers(pa.uint32(), self.n, [None, raw])
            batch = pa.record_batch([tokens], names=["tokens"])
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
                writer.write_batch(batch)
            del batch, tokens, raw
            sha = sha256_file(tmp)
            name = f"{self.split}-{len(self.shards):05d}-{sha[:12]}.arrow"
            commit(tmp, self.out / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self.scratch.unlink(missing_ok=True)
        self.shards.append({"file": name, "tokens": self.n, "bytes": (self.out / name).stat().st_size, "sha256": sha})


# The command


def input_key(cfg: PrepareConfig, inputs: list[dict]) -> str:
    """The tokenization cache key: a hash of everything the shards depend on, the inputs' bytes and the
    settings that shape the output. `inputs` is `[{"spec": SOURCE, "inputs": [provenance, ...]}, ...]`, the
    shape of the manifest's `sources`; the flow keys its shard folders and its task cache by the same hash."""
    key = {
        "format": FORMAT,
        "tokenizer": cfg.tokenizer,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "chunk_chars": cfg.chunk_chars,
        "text_field": cfg.text_field,
        "sources": [[s["spec"], [p["sha256"] for p in s["inputs"]]] for s in inputs],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared folder; a missing, unreadable or foreign one is a DataError that says
    how to rebuild it."""
    path = Path(data_dir) / "manifest.json"
    rerun = f"re-run `gptmini prepare SOURCE... --out {data_dir} --force` to rebuild it"
    if not path.exists():
        raise DataError(f"no manifest.json in {data_dir}; run `gptmini prepare SOURCE... --out {data_dir}` first")
    try:
        manifest = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); {rerun}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path} has format {found!r}, expected {FORMAT!r}; {rerun}")
    return manifest


def _up_to_date(out: Path, key: str) -> dict | None:
    try:
        manifest = read_manifest(out)
    except DataError:  # none yet, or one to overwrite
        return None
    if manifest.get("input_key") != key:
        return None
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = out / shard["file"]
            if not path.exists() or path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                return None
    return manifest


def check_config(cfg: PrepareConfig) -> None:
    if not cfg.sources:
        raise DataError("no sources given; name at least one, e.g. `gptmini prepare embedded:python-docs --out data/`")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"--val-fraction {cfg.val_fraction} is outside [0, 1); e.g. 0.05 holds out 5% of documents")
    if cfg.shard_tokens < 1:
        raise DataError(f"--shard-tokens {cfg.shard_tokens} must be >= 1, e.g. {SHARD_TOKENS}")
    if cfg.workers < 1:
        raise DataError(f"--workers {cfg.workers} must be >= 1")


def prepare(cfg: PrepareConfig) -> Result:
    check_config(cfg)
    t0 = time.perf_counter()
    try:
        tok = get_tokenizer(cfg.tokenizer)
    except ValueError as exc:  # an unknown name, or an encoding that needs the network
        raise DataError(f"--tokenizer: {exc}") from exc
    stats = Stats()
    cache = Cache(Path(cfg.cache_dir))
    sources = [
        open_source(
            spec, cache=cache, http=cfg.http, refresh=cfg.refresh, text_field=cfg.text_field,
            chunk_chars=cfg.chunk_chars, stats=stats,
        )
        for spec in cfg.sources
    ]
    out = Path(cfg.out)
    key = input_key(cfg, [{"spec": s.spec, "inputs": s.provenance} for s in sources])
    if not cfg.force and (manifest := _up_to_date(out, key)) is not None:
        return Result(manifest, True, time.perf_counter() - t0, 0, 0)

    out.mkdir(parents=True, exist_ok=True)
    writers = [ShardWriter(out, split, cfg.shard_tokens) for split in SPLITS]
    counts, replaced_before = Counts(), replaced_bytes()
    input_bytes = sum(p.get("bytes", 0) for s in sources for p in s.provenance)
    workers = cfg.workers if input_bytes >= cfg.inline_bytes else 1
    try:
        task_iter = tasks(pieces(sources, cfg.val_fraction, stats, counts), TASK_CHARS)
        last_report = time.perf_counter()
        for train, val in tokenize(task_iter, cfg.tokenizer, workers):
            writers[0].write(train)
            writers[1].write(val)
            if time.perf_counter() - last_report > cfg.report_every_s:
                last_report = time.perf_counter()
                print(f"prepare: {counts.text_chars / 1e6:,.1f}M characters, {sum(w.total for w in writers):,} tokens, "
                      f"{counts.text_chars / 1e6 / (last_report - t0):.1f}M characters/s", file=sys.stderr, flush=True)
        shards = [w.close() for w in writers]
    except BaseException:
        try:
            live = read_manifest(out)
            keep = {s["file"] for split in live["splits"].values() for s in split["shards"]}
        except DataError:
            keep = set()
        for w in writers:
            w.abort(keep)
        raise
    stats.replaced_bytes = replaced_bytes() - replaced_before
    if stats.documents == 0:
        raise DataError(
            f"the corpus is empty: {stats.empty_documents} document(s), all empty or whitespace-only, in "
            f"{', '.join(cfg.sources)}; give sources that hold text"
        )
    manifest = {
        "format": FORMAT,
        "input_key": key,
        "created_at": utc_now(),
        "tokenizer": tok.name,
        "n_vocab": tok.n_vocab,
        "vocab_size": tok.vocab_size,
        "eot_token": tok.eot_token,
        "dtype": "uint32",
        "column": "tokens",
        "val_fraction": cfg.val_fraction,
        "split_rule": "val if the first 8 bytes of sha256(document's first chunk), big-endian, < val_fraction * 2**64",
        "shard_tokens": cfg.shard_tokens,
        "chunk_chars": cfg.chunk_chars,
        "splits": {
            split: {
                "tokens": sum(s["tokens"] for s in shards[i]),
                "documents": counts.documents[i],
                "shards": shards[i],
            }
            for i, split in enumerate(SPLITS)
        },
        "stats": asdict(stats),
        # The manifest travels (MLflow artifact, registry tags): no user:password@ or ?token= from the URLs.
        "sources": redact_tree([{"spec": s.spec, "inputs": s.provenance} for s in sources]),
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    _remove_stale_shards(out, manifest)
    return Result(manifest, False, time.perf_counter() - t0, counts.text_chars, workers)


def _remove_stale_shards(out: Path, manifest: dict) -> None:
    keep = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    for path in out.glob("*.arrow"):
        if path.name.split("-")[0] in SPLITS and path.name not in keep:
            path.unlink()
