"""Preparing a corpus: text → tiktoken ids → uint32 Arrow IPC shards + manifest.json.

The main process reads and decodes the sources and deals their text to the splits; worker processes
tokenize (tiktoken releases the GIL, but one process per core also overlaps the Python-side work); the
main process writes the token stream of each split into shards of at most `shard_tokens` tokens. At most
`2 * workers` tasks are in flight, so memory stays bounded however large the input.

The split is by chunks within documents, not by whole documents: each document is cut into chunks of at
most `split_chars` characters at tokenizer-safe points, and chunk i of a document goes to val when
floor((i+1)*f + o) > floor(i*f + o), f = val_fraction, o in [0, 1) a hash of the document's name (its
identity: the absolute path, URL or embedded name). So a chunk's split depends only on its document and its
index within it: adding, changing or removing other documents moves no chunk between the splits, and text a
model trained on never turns up in a later val split. Within a document exactly one chunk in 1/f goes to
val (a document of n chunks holds floor(n*f) or ceil(n*f) of them), and a one-chunk document is val with
probability f. Each run of one split's chunks within a document ends with end-of-text in that split's
stream, so no window reads from one chunk into text that was not next to it, and every split holds the
same text whichever tokenizer cuts it into tokens.

Tokenizing is incremental: each input (a file, a download, the embedded corpus) is tokenized once per
tokenizer and settings, and its train and val tokens are kept in the cache (`CACHE/tokens/<key>/`, the key
a hash of the settings, the input's identity and its sha256). A corpus that gained a few files tokenizes
those files and copies the rest. With `since` (an earlier manifest), the manifest marks which inputs are
new since that dataset and where their tokens sit in each split's stream, so training can favour them and
the gate can measure them apart.

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
from collections.abc import Callable, Iterable, Iterator
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
from gptmini.errors import UserError
from gptmini.files import commit, read_json, sha256_file, write_atomic
from gptmini.redact import redact_tree
from gptmini.tokenizer import DEFAULT_TOKENIZER, Tokenizer, bpe_size, check_tokenizer_name, get_tokenizer, train_bpe

FORMAT = "gptmini-tokens/2"
# Format 1 dealt chunk k of the whole corpus by its position, so adding a document moved later chunks between
# the splits: its folders must be prepared again.
OLD_FORMATS = ("gptmini-tokens/1",)
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
    since: Path | None = None  # an earlier dataset (its folder or manifest.json): mark the inputs new since it
    inline_bytes: int = INLINE_BYTES  # inputs smaller than this are tokenized without worker processes
    report_every_s: float = 10.0  # progress lines on stderr during long runs


@dataclass
class Result:
    manifest: dict
    up_to_date: bool  # True: nothing was written
    seconds: float
    text_chars: int  # characters tokenized in this run (inputs taken from the token cache not counted)
    workers: int  # tokenizer processes used (1: this process)
    tokenized_inputs: int = 0  # inputs tokenized in this run; the others came from the token cache


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


class SplitRule:
    """Chunk i of document `name` is val when floor((i+1)*f + o) > floor(i*f + o), o = the document's phase, a
    hash of its name in [0, 1): one chunk in 1/f within each document, whichever documents sit around it."""

    def __init__(self, val_fraction: float):
        f = Fraction(str(val_fraction))  # exact: 0.05 * 20 must be 1, not 0.9999...
        self.p, self.q = f.numerator, f.denominator

    def document(self, name: str) -> Callable[[int], int]:
        """The split (0 train, 1 val) of each chunk index of document `name`."""
        # Integers throughout: floor(i*p/q + h/2^64) = (i*p*2^64 + h*q) // (q*2^64).
        h = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:8], "big")
        p, q, one = self.p, self.q, 1 << 64
        return lambda i: int(((i + 1) * p * one + h * q) // (q * one) > (i * p * one + h * q) // (q * one))


@dataclass
class Counts:
    chunks: list[int] = field(default_factory=lambda: [0, 0])
    text_chars: int = 0


def pieces(documents: Iterable, rule: SplitRule, split_chars: int, stats: Stats,
           counts: Counts) -> Iterator[tuple[int, str, bool]]:
    """(split, text, ends_run): each document's chunks dealt to the splits, consecutive chunks of one split
    joined (they are adjacent text), `ends_run` where end-of-text follows in that split's stream."""
    for name, doc_chunks in nonempty_documents(documents, stats):
        split_of, i = rule.document(name), 0
        run, run_split, run_chars = [], 0, 0
        for big in doc_chunks:
            for text in split_text(big, split_chars):
                split, i = split_of(i), i + 1
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


def tokenize(items: Iterable[tuple[object, list]], name: str, workers: int,
             search: str | None = None) -> Iterator[tuple[object, tuple[np.ndarray, np.ndarray]]]:
    """(tag, tokens of each split) of each (tag, task), in order; the tags stay in this process."""
    if workers <= 1:
        _init_worker(name, search)
        for tag, task in prefetched(items):
            yield tag, encode_task(task)
        return
    # spawn, not fork: prepare may run inside a threaded host (a Prefect task), where fork can deadlock.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(name, search)) as ex:
        pending = deque()
        for tag, task in items:
            pending.append((tag, ex.submit(encode_task, task)))
            if len(pending) >= 2 * workers:
                tag, done = pending.popleft()
                yield tag, done.result()
        while pending:
            tag, done = pending.popleft()
            yield tag, done.result()


# The token cache: each input's tokens, once per tokenizer and settings


@dataclass
class Part:
    """One input of one source (a file, a download, the embedded corpus): what the token cache keys."""

    spec: str
    provenance: list[dict]
    read: Callable[[], Iterator]
    key: str = ""

    @property
    def ids(self) -> list[str]:
        return [input_id(p) for p in self.provenance]


def input_id(prov: dict) -> str:
    """An input's identity: its absolute path, its URL, or the embedded corpus's name."""
    return prov.get("path") or prov.get("url") or prov["source"]


def settings_key(cfg: PrepareConfig, tokenizer: str) -> dict:
    """What an input's tokens depend on besides its own bytes and identity."""
    return {"format": FORMAT, "tokenizer": tokenizer, "val_fraction": cfg.val_fraction,
            "split_chars": cfg.split_chars, "chunk_chars": cfg.chunk_chars, "text_field": cfg.text_field}


def part_key(settings: dict, part: Part) -> str:
    ident = [part.spec, [[input_id(p), p["sha256"]] for p in part.provenance]]
    return hashlib.sha256(json.dumps([settings, ident], sort_keys=True).encode()).hexdigest()


class TokenCache:
    """`root/<key>/`: train.u32 and val.u32 (raw uint32 tokens, end-of-texts included) and info.json (counts).
    An entry is written under a temporary name and renamed into place, so a reader sees all of it or none."""

    FILES = ("train.u32", "val.u32")

    def __init__(self, root: Path):
        self.root = root

    def info(self, key: str) -> dict | None:
        folder = self.root / key
        try:
            info = read_json(folder / "info.json")
        except (OSError, json.JSONDecodeError):
            return None
        sizes = [(folder / f).stat().st_size if (folder / f).is_file() else -1 for f in self.FILES]
        return info if sizes == [4 * n for n in info["tokens"]] else None  # a damaged entry is made again

    def read(self, key: str) -> list[np.ndarray]:
        """Each split's tokens, memory-mapped: one input of many GB is copied into the shards page by page."""
        return [np.memmap(self.root / key / f, dtype=np.uint32, mode="r") if n else np.empty(0, np.uint32)
                for f, n in zip(self.FILES, self.info(key)["tokens"])]

    def writer(self, key: str) -> CacheEntry:
        self.root.mkdir(parents=True, exist_ok=True)
        return CacheEntry(self.root, key)


class CacheEntry:
    def __init__(self, root: Path, key: str):
        import tempfile

        self.root, self.key = root, key
        self.tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key[:12]}."))
        self.files = [open(self.tmp / f, "wb") for f in TokenCache.FILES]
        self.tokens = [0, 0]

    def write(self, split: int, tokens: np.ndarray) -> None:
        tokens.tofile(self.files[split])
        self.tokens[split] += len(tokens)

    def commit(self, info: dict) -> None:
        for f in self.files:
            f.close()
        # No fsync: a cache entry is made again when it reads back short or garbled (`TokenCache.info`), and
        # syncing one entry per input cost 0.1-1 s each on a shared disk.
        (self.tmp / "info.json").write_text(json.dumps({**info, "tokens": self.tokens}))
        try:
            os.rename(self.tmp, self.root / self.key)
        except OSError:  # the same entry, written meanwhile by another prepare
            self.abort()

    def abort(self) -> None:
        import shutil

        for f in self.files:
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def part_tasks(parts: list[Part], todo: list[int], rule: SplitRule, split_chars: int,
               infos: dict[int, dict]) -> Iterator[tuple[tuple[int, bool], list]]:
    """((part, last), task) for each part to tokenize, in order; each part's tasks end with an empty `last`
    one, by which time infos[part] holds its counts."""
    for i in todo:
        counts, stats, before = Counts(), Stats(), replaced_bytes()
        for task in tasks(pieces(parts[i].read(), rule, split_chars, stats, counts), TASK_CHARS):
            yield (i, False), task
        stats.replaced_bytes = replaced_bytes() - before
        infos[i] = {"chunks": counts.chunks, "text_chars": counts.text_chars, **asdict(stats)}
        yield (i, True), []


def earlier_inputs(since: Path) -> tuple[dict, set[tuple[str, str]]]:
    """An earlier dataset's manifest and its inputs as (identity, sha256) pairs."""
    since = Path(since)
    manifest = read_manifest(since)
    return manifest, {(input_id(p), p["sha256"]) for s in manifest["sources"] for p in s["inputs"]}


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


def input_key(cfg: PrepareConfig, inputs: list[dict], since_key: str | None = None) -> str:
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
    if since_key:  # the same shards, marked new against another dataset, are another output
        key["since"] = since_key
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared folder (or the manifest.json file itself, e.g. one downloaded from a run);
    a missing, unreadable or foreign one is a DataError that says how to rebuild it."""
    path = Path(data_dir)
    if path.is_file():
        data_dir, path = path.parent, path
    else:
        path = path / "manifest.json"
    if not path.exists():
        raise DataError(f"no manifest.json in {data_dir}; run `gptmini prepare SOURCE... --out {data_dir}` first")
    return _read_manifest_file(path, data_dir)


def _read_manifest_file(path: Path, data_dir: str | Path) -> dict:
    rerun = f"re-run `gptmini prepare SOURCE... --out {data_dir} --force` to rebuild it"
    try:
        manifest = read_json(path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); {rerun}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found in OLD_FORMATS:
        raise DataError(f"{path} has format {found!r}, written by an earlier gptmini whose split moved chunks "
                        f"between train and val when documents were added; {rerun} (format {FORMAT!r})")
    if not isinstance(manifest, dict) or found != FORMAT:
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
    try:  # the name only: a published encoding, a trained one, or bpe:N to train (bpe_size checks N)
        if not bpe_size(cfg.tokenizer):
            check_tokenizer_name(cfg.tokenizer)
    except UserError as exc:
        raise DataError(f"--tokenizer: {exc}") from None
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
    stats, rule = Stats(), SplitRule(cfg.val_fraction)
    docs = (doc for source in open_sources(cfg, stats) for doc in source.documents)
    texts = (text for split, text, _ in pieces(docs, rule, cfg.split_chars, stats, Counts()) if split == 0)
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
    earlier, earlier_ids = earlier_inputs(cfg.since) if cfg.since else (None, set())
    key = input_key(cfg, [{"spec": s.spec, "inputs": s.provenance} for s in sources],
                    earlier["input_key"] if earlier else None)
    if not cfg.force and (manifest := _up_to_date(out, key)) is not None:
        return Result(manifest, True, time.perf_counter() - t0, 0, 0)

    out.mkdir(parents=True, exist_ok=True)
    if tok is None:
        tok = train_tokenizer(cfg, out)
    settings = settings_key(cfg, tok.name)
    parts = [Part(s.spec, prov, read) for s in sources for prov, read in s.inputs()]
    for part in parts:
        part.key = part_key(settings, part)
    cache = TokenCache(Path(cfg.cache_dir) / "tokens")
    infos: dict[int, dict] = {i: info for i, part in enumerate(parts) if (info := cache.info(part.key)) is not None}
    todo = [i for i in range(len(parts)) if i not in infos]
    todo_set = set(todo)  # infos fills in as the tokenizer reads ahead
    writers = [ShardWriter(out, split, cfg.shard_tokens) for split in SPLITS]
    todo_bytes = sum(p.get("bytes", 0) for i in todo for p in parts[i].provenance)
    workers = cfg.workers if todo_bytes >= cfg.inline_bytes else 1
    rule, records, text_chars, entry = SplitRule(cfg.val_fraction), [], 0, None
    try:
        results = tokenize(part_tasks(parts, todo, rule, cfg.split_chars, infos), tok.name, workers, str(out))
        last_report = time.perf_counter()
        for i, part in enumerate(parts):
            start = [w.total for w in writers]
            if i not in todo_set:  # tokenized before under these settings
                for split, tokens in enumerate(cache.read(part.key)):
                    writers[split].write(tokens)
            else:
                entry = cache.writer(part.key)
                for (j, last), split_tokens in results:
                    if last:
                        break
                    for split, tokens in enumerate(split_tokens):
                        writers[split].write(tokens)
                        entry.write(split, tokens)
                    if time.perf_counter() - last_report > cfg.report_every_s:
                        last_report = time.perf_counter()
                        print(f"prepare: input {i + 1}/{len(parts)}, {sum(w.total for w in writers):,} tokens",
                              file=sys.stderr, flush=True)
                entry.commit(infos[i])
                entry = None
                text_chars += infos[i]["text_chars"]
            records.append(part_record(part, infos[i], start, [w.total for w in writers], i not in todo_set,
                                       earlier_ids if earlier else None))
        shards = [w.close() for w in writers]
    except BaseException:
        if entry is not None:
            entry.abort()
        try:
            live = read_manifest(out)
            keep = {s["file"] for split in live["splits"].values() for s in split["shards"]}
        except DataError:
            keep = set()
        for w in writers:
            w.abort(keep)
        raise
    for name in ("documents", "empty_documents", "replaced_bytes"):
        setattr(stats, name, sum(infos[i][name] for i in range(len(parts))))
    if stats.documents == 0:
        raise DataError(
            f"the corpus is empty: {stats.empty_documents} document(s), all empty or whitespace-only, in "
            f"{', '.join(cfg.sources)}; give sources that hold text"
        )
    chunks = [sum(infos[i]["chunks"][split] for i in range(len(parts))) for split in range(len(SPLITS))]
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
                      "chunk i of a document is val when floor((i+1)*f + o) > floor(i*f + o), f = val_fraction, "
                      "o = the first 8 bytes of sha256(document name) / 2^64; each run of one split's chunks within "
                      "a document ends with end-of-text",
        "shard_tokens": cfg.shard_tokens,
        "chunk_chars": cfg.chunk_chars,
        "documents": stats.documents,
        "splits": {
            split: {
                "tokens": sum(s["tokens"] for s in shards[i]),
                "chunks": chunks[i],
                "shards": shards[i],
            }
            for i, split in enumerate(SPLITS)
        },
        "stats": asdict(stats),
        # The manifest travels (MLflow artifact, registry tags): no user:password@ or ?token= from the URLs.
        "sources": redact_tree([{"spec": s.spec, "inputs": s.provenance} for s in sources]),
        # Each input's place in the token streams: [start, end) of its tokens in each split.
        "inputs": redact_tree(records),
        "tokenized_inputs": len(todo),
    }
    if earlier:
        new = [r for r in records if r["new"]]
        manifest["since"] = {
            "input_key": earlier["input_key"], "new_inputs": len(new),
            "new_documents": sum(r["documents"] for r in new),
            "new_tokens": {split: sum(r[split][1] - r[split][0] for r in new) for split in SPLITS},
        }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    _remove_stale_shards(out, manifest)
    return Result(manifest, False, time.perf_counter() - t0, text_chars, workers, len(todo))


def part_record(part: Part, info: dict, start: list[int], end: list[int], cached: bool,
                earlier: set[tuple[str, str]] | None) -> dict:
    record = {"source": part.spec, "ids": part.ids, "sha256": [p["sha256"] for p in part.provenance],
              "documents": info["documents"], "cached": cached,
              **{split: [start[i], end[i]] for i, split in enumerate(SPLITS)}}
    if earlier is not None:
        record["new"] = any((input_id(p), p["sha256"]) not in earlier for p in part.provenance)
    return record


def new_ranges(manifest: dict, split: str) -> list[tuple[int, int]]:
    """[start, end) of the tokens of the inputs new since the manifest's `since` dataset, in `split`'s stream;
    empty when the manifest names no earlier dataset."""
    if "since" not in manifest:
        return []
    return [tuple(r[split]) for r in manifest["inputs"] if r.get("new") and r[split][1] > r[split][0]]


def _remove_stale_shards(out: Path, manifest: dict) -> None:
    keep = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    for path in out.glob("*.arrow"):
        if path.name.split("-")[0] in SPLITS and path.name not in keep:
            path.unlink()
