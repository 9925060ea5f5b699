"""Preparing a corpus: text → tiktoken ids → uint32 Arrow IPC shards + manifest.json.

The main process reads and decodes the sources and deals their text to the splits; worker processes
tokenize (tiktoken releases the GIL, but one process per core also overlaps the Python-side work); the
main process writes the token stream of each split into shards of at most `shard_tokens` tokens. At most
`2 * workers` tasks are in flight, so memory stays bounded however large the input.

The split is by chunks within documents, not by whole documents: each document is cut into chunks of at
most `split_chars` characters at tokenizer-safe points, and chunk k of the corpus goes to val when
floor(k*f + 1 - f) > floor((k-1)*f + 1 - f), f = val_fraction. That deals exactly one chunk in 1/f to val
(the second chunk first, so a one-file corpus has both splits and chunk 0 always trains), whatever the
document sizes. Each run of one split's chunks within a document ends with end-of-text in that split's
stream, so no window reads from one chunk into text that was not next to it, and every split holds the
same text whichever tokenizer cuts it into tokens.

Output names carry their sha256 (`train-00000-<sha12>.arrow`) and `manifest.json` is replaced last, in one
rename: a reader sees the old shard set or the new one, never a mix. The manifest records `input_key`, a
hash of the inputs' sha256s and the settings; re-running with the same inputs finds it, verifies the shards
and does nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
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
    split_text,
    utc_now,
)
from gptmini.files import commit, read_json, sha256_file, write_atomic
from gptmini.redact import redact_tree
from gptmini.tokenizer import DEFAULT_TOKENIZER, Tokenizer, bpe_size, get_tokenizer, train_bpe

FORMAT = "gptmini-tokens/1"
SPLITS = ("train", "val")
SHARD_TOKENS = 100_000_000  # 400 MB shards, as nanoGPT's FineWeb shards
# About 256 cl100k tokens: the demo corpus (466 KB) gives some 450 chunks, so 5% is 23 val chunks, enough for
# the gate's paired comparison, and a chunk still fills a window of the demo model's context.
SPLIT_CHARS = 1024
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
    split_chars: int = SPLIT_CHARS  # the split deals chunks of at most this many characters
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


def _init_worker(name: str, search: str | None = None) -> None:
    global _TOKENIZER
    _TOKENIZER = get_tokenizer(name, search)


def encode_task(task: list[tuple[int, str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of each split, in order: one (split, text, ends_run) piece after another."""
    enc, eot = _TOKENIZER.enc, np.array([_TOKENIZER.eot_token], dtype=np.uint32)
    parts: tuple[list, list] = ([], [])
    for split, text, ends_run in task:
        # encode_to_numpy with nothing special allowed or disallowed == encode_ordinary, minus the list.
        parts[split].append(enc.encode_to_numpy(text, disallowed_special=()))
        if ends_run:
            parts[split].append(eot)
    return tuple(np.concatenate(p) if p else np.empty(0, np.uint32) for p in parts)


class Dealer:
    """Chunk k goes to val when floor(k*f + 1 - f) steps up at k: one chunk in 1/f, the first at k = 1."""

    def __init__(self, val_fraction: float):
        self.f = Fraction(str(val_fraction))  # exact: 0.05 * 20 must be 1, not 0.9999...
        self.k = 0

    def level(self, k: int) -> int:
        return math.floor(k * self.f + 1 - self.f)

    def next(self) -> int:
        k, self.k = self.k, self.k + 1
        return int(k > 0 and self.level(k) > self.level(k - 1))


@dataclass
class Counts:
    chunks: list[int] = field(default_factory=lambda: [0, 0])
    text_chars: int = 0


def pieces(sources: list[Source], val_fraction: float, split_chars: int, stats: Stats,
           counts: Counts) -> Iterator[tuple[int, str, bool]]:
    """(split, text, ends_run): each document's chunks dealt to the splits, consecutive chunks of one split
    joined (they are adjacent text), `ends_run` where end-of-text follows in that split's stream."""
    dealer = Dealer(val_fraction)
    for source in sources:
        for _, doc_chunks in nonempty_documents(source.documents, stats):
            run, run_split, run_chars = [], 0, 0
            for big in doc_chunks:
                for text in split_text(big, split_chars):
                    split = dealer.next()
                    counts.chunks[split] += 1
                    counts.text_chars += len(text)
                    if run and split != run_split:
                        yield run_split, "".join(run), True
                        run, run_chars = [], 0
                    elif run_chars >= TASK_CHARS:  # a long run: hand it over in parts (the cuts are safe)
                        yield run_split, "".join(run), False
                        run, run_chars = [], 0
                    run.append(text)
                    run_split, run_chars = split, run_chars + len(text)
            if run:
                yield run_split, "".join(run), True


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


def tokenize(task_iter: Iterable[list], name: str, workers: int,
             search: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if workers <= 1:
        _init_worker(name, search)
        yield from map(encode_task, prefetched(task_iter))
        return
    # spawn, not fork: prepare may run inside a threaded host (a Prefect task), where fork can deadlock.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(name, search)) as ex:
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
        "split_chars": cfg.split_chars,
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
    if (name := manifest.get("tokenizer_file")) and (
            not (out / name).is_file() or sha256_file(out / name) != manifest["tokenizer_sha256"]):
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
        raise DataError(f"--val-fraction {cfg.val_fraction} is outside [0, 1); e.g. 0.05 holds out 5% of the text")
    if cfg.split_chars < 16:
        raise DataError(f"--split-chars {cfg.split_chars} must be >= 16, e.g. {SPLIT_CHARS} (about 256 tokens)")
    if cfg.shard_tokens < 1:
        raise DataError(f"--shard-tokens {cfg.shard_tokens} must be >= 1, e.g. {SHARD_TOKENS}")
    if cfg.workers < 1:
        raise DataError(f"--workers {cfg.workers} must be >= 1")


def open_sources(cfg: PrepareConfig, stats: Stats) -> list[Source]:
    cache = Cache(Path(cfg.cache_dir))
    return [
        open_source(spec, cache=cache, http=cfg.http, refresh=cfg.refresh, text_field=cfg.text_field,
                    chunk_chars=cfg.chunk_chars, stats=stats)
        for spec in cfg.sources
    ]


def load_tokenizer(cfg: PrepareConfig) -> Tokenizer | None:
    """The named tokenizer; None for `bpe:N`, which is trained on the train split first."""
    try:
        return None if bpe_size(cfg.tokenizer) else get_tokenizer(cfg.tokenizer)
    except ValueError as exc:  # an unknown name, or an encoding that needs the network
        raise DataError(f"--tokenizer: {exc}") from exc


def train_tokenizer(cfg: PrepareConfig, out: Path) -> Tokenizer:
    """`bpe:N`: a byte-level BPE of N ids trained on the train split's text (a second read of the sources;
    downloads come from the cache), saved as out/tokenizer.tiktoken."""
    stats = Stats()
    texts = (text for split, text, _ in pieces(open_sources(cfg, stats), cfg.val_fraction, cfg.split_chars, stats,
                                               Counts()) if split == 0)
    try:
        return train_bpe(texts, bpe_size(cfg.tokenizer), out)
    except ValueError as exc:
        raise DataError(f"--tokenizer {cfg.tokenizer}: {exc}") from exc


def prepare(cfg: PrepareConfig) -> Result:
    check_config(cfg)
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg)
    stats = Stats()
    sources = open_sources(cfg, stats)
    out = Path(cfg.out)
    key = input_key(cfg, [{"spec": s.spec, "inputs": s.provenance} for s in sources])
    if not cfg.force and (manifest := _up_to_date(out, key)) is not None:
        return Result(manifest, True, time.perf_counter() - t0, 0, 0)

    out.mkdir(parents=True, exist_ok=True)
    if tok is None:
        tok = train_tokenizer(cfg, out)
    writers = [ShardWriter(out, split, cfg.shard_tokens) for split in SPLITS]
    counts, replaced_before = Counts(), replaced_bytes()
    input_bytes = sum(p.get("bytes", 0) for s in sources for p in s.provenance)
    workers = cfg.workers if input_bytes >= cfg.inline_bytes else 1
    try:
        task_iter = tasks(pieces(sources, cfg.val_fraction, cfg.split_chars, stats, counts), TASK_CHARS)
        last_report = time.perf_counter()
        for train, val in tokenize(task_iter, tok.name, workers, str(out)):
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
        "tokenizer_file": tok.file.name if tok.file else None,
        "tokenizer_sha256": tok.sha256,
        "n_vocab": tok.n_vocab,
        "vocab_size": tok.vocab_size,
        "eot_token": tok.eot_token,
        "dtype": "uint32",
        "column": "tokens",
        "val_fraction": cfg.val_fraction,
        "split_chars": cfg.split_chars,
        "split_rule": "each document cut into chunks of at most split_chars characters at tokenizer-safe points; "
                      "chunk k (0-based, over the corpus in order) is val when floor(k*f + 1 - f) > "
                      "floor((k-1)*f + 1 - f), f = val_fraction; each run of one split's chunks within a document "
                      "ends with end-of-text",
        "shard_tokens": cfg.shard_tokens,
        "chunk_chars": cfg.chunk_chars,
        "documents": stats.documents,
        "splits": {
            split: {
                "tokens": sum(s["tokens"] for s in shards[i]),
                "chunks": counts.chunks[i],
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
