"""The retrieval index: the train split's text in passages, searched with BM25 (SQLite FTS5).

Passages are cut from exactly the chunks `gptmini prepare` deals to the train split (the same `SplitRule`,
the same cuts), so no val text is ever in the index. Each train chunk (at most `split_chars` characters) is
cut again at tokenizer-safe points into passages of at most `PASSAGE_CHARS` characters: about 128 cl100k
tokens, so a passage, an end-of-text and a prompt fit the demo model's 256 positions (In-Context RALM
prepends passages of about 100 words). A passage knows its document, its character offset there, its source
and the input it was read from.

Why SQLite FTS5, of the three retrievers measured (BENCHMARKS.md, "Which retriever for the index, and how
fast is its query?"): bm25s answers faster, and bm25s and tantivy store less, but FTS5 is in the standard
library, writes the same bytes for the same rows (so the file can be named by its sha256; tantivy's segment
files are named at random), and adds and removes rows (bm25s rebuilds its whole matrix), so a grown corpus
reads only its new inputs. BM25's statistics are computed at query time, so an index updated in place ranks
as one built anew.

A query's cost in FTS5 is the passages it scores: every passage that holds any OR-ed word. So a query keeps
only its rarest words, as many as fit `MAX_POSTINGS` passages in all (their document frequencies are stored
in the `terms` table), and ranks with BM25 over those. A common word's BM25 weight is near 0, so on a small
corpus, where every word fits, nothing is dropped; on a 200 MB one, where all of a query's words would make
FTS5 score most passages, this took a query from seconds to tens of milliseconds (BENCHMARKS.md).

The index is content-addressed like the shards: `index-<sha12>.sqlite` in the prepared folder, its sha256 in
the manifest's `index` entry, written under a temporary name and renamed, and the manifest replaced last.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptmini.data.prepare import PrepareConfig, SplitRule, input_id, open_sources, read_manifest
from gptmini.data.sources import DataError, Stats, nonempty_documents, split_text
from gptmini.errors import UserError
from gptmini.files import commit, sha256_file, write_atomic
from gptmini.tokenizer import Tokenizer

FORMAT = "gptmini-index/2"
PASSAGE_CHARS = 512
QUERY_TOKENS = 32  # In-Context RALM queries with the last 32 tokens of the prefix
MAX_K = 50  # OpenAI's vector-store search returns 1 to 50 results
MAX_POSTINGS = 20_000  # passages one query may score; see `Index.match`
RETRIEVER = "sqlite-fts5-bm25"


@dataclass(frozen=True)
class Passage:
    id: str  # p<rowid>: stable within one index file
    document: str
    offset: int  # characters from the start of the document
    source: str  # the `gptmini prepare` source spec it came from
    text: str
    score: float = 0.0  # BM25, higher is better; 0 for a passage not found by search


@dataclass(frozen=True)
class Chunk:
    document: str
    offset: int
    split: int  # 0 train, 1 val
    text: str


def chunks(documents: Iterable, rule: SplitRule, split_chars: int, stats: Stats) -> Iterator[Chunk]:
    """Every chunk of every document with its split: the same cuts and split as `data.prepare.pieces`."""
    for name, doc_chunks in nonempty_documents(documents, stats):
        split_of, i, offset = rule.document(name), 0, 0
        for big in doc_chunks:
            for text in split_text(big, split_chars):
                yield Chunk(name, offset, split_of(i), text)
                i, offset = i + 1, offset + len(text)


def passages(chunk_stream: Iterable[Chunk], passage_chars: int = PASSAGE_CHARS) -> Iterator[tuple[str, int, str]]:
    """(document, offset, text) of each passage of the train chunks; val chunks are skipped."""
    for c in chunk_stream:
        if c.split != 0:
            continue
        offset = c.offset
        for text in split_text(c.text, passage_chars):
            if not text.isspace():
                yield c.document, offset, text
            offset += len(text)


def val_runs(chunk_stream: Iterable[Chunk]) -> Iterator[tuple[str, str]]:
    """(document, text) of each run of consecutive val chunks within a document: the val split's pieces."""
    run_doc, run = None, []
    for c in chunk_stream:
        if run and (c.split != 1 or c.document != run_doc):
            yield run_doc, "".join(run)
            run = []
        if c.split == 1:
            run_doc = c.document
            run.append(c.text)
    if run:
        yield run_doc, "".join(run)


def source_config(data_dir: str | Path, manifest: dict, text_field: str = "text") -> PrepareConfig:
    """The settings that cut the folder's chunks, to read its sources again (downloads from the cache)."""
    return PrepareConfig(sources=[s["spec"] for s in manifest["sources"]], out=Path(data_dir),
                         val_fraction=manifest["val_fraction"], split_chars=manifest["split_chars"],
                         chunk_chars=manifest["chunk_chars"], text_field=text_field, workers=1)


def read_inputs(data_dir: str | Path, manifest: dict,
                text_field: str = "text") -> Iterator[tuple[str, str, str, Callable[[], Iterator]]]:
    """(source spec, input identity, sha256, read) of each input of a prepared folder, read again."""
    cfg = source_config(data_dir, manifest, text_field)
    for source in open_sources(cfg, Stats()):
        for prov, read in source.inputs():
            ident = "\n".join(input_id(p) for p in prov)
            yield source.spec, ident, "\n".join(p["sha256"] for p in prov), read


def read_val(data_dir: str | Path) -> list[tuple[str, str]]:
    """(document, text) of each val piece of a prepared folder, from its sources."""
    manifest = read_manifest(data_dir)
    rule = SplitRule(manifest["val_fraction"])
    return [run for _, _, _, read in read_inputs(data_dir, manifest)
            for run in val_runs(chunks(read(), rule, manifest["split_chars"], Stats()))]


# The index file

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE inputs(input TEXT PRIMARY KEY, sha256 TEXT, source TEXT, passages INTEGER) WITHOUT ROWID;
CREATE TABLE passages(rowid INTEGER PRIMARY KEY, input TEXT, document TEXT, offset INTEGER, source TEXT, text TEXT);
CREATE INDEX passages_input ON passages(input);
CREATE VIRTUAL TABLE fts USING fts5(text, content='passages', content_rowid='rowid');
CREATE TABLE terms(term TEXT PRIMARY KEY, documents INTEGER) WITHOUT ROWID;
"""
# fts5vocab counts a word's passages by reading its whole posting list (2 ms for a common word at 200 MB):
# the counts are stored instead, refreshed whenever the passages change.
VOCAB = "CREATE VIRTUAL TABLE IF NOT EXISTS temp.vocab USING fts5vocab(main, fts, 'row')"


def _insert(db: sqlite3.Connection, source: str, ident: str, sha: str, rows: Iterable[tuple[str, int, str]]) -> int:
    start = db.execute("SELECT coalesce(max(rowid), 0) FROM passages").fetchone()[0]
    rows = [(start + 1 + j, ident, doc, off, source, text) for j, (doc, off, text) in enumerate(rows)]
    db.executemany("INSERT INTO passages VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.executemany("INSERT INTO fts(rowid, text) VALUES (?, ?)", [(r[0], r[5]) for r in rows])
    db.execute("INSERT INTO inputs VALUES (?, ?, ?, ?)", (ident, sha, source, len(rows)))
    return len(rows)


def _remove(db: sqlite3.Connection, ident: str) -> None:
    # An external-content FTS5 table forgets a row by being handed its old text.
    db.execute("INSERT INTO fts(fts, rowid, text) SELECT 'delete', rowid, text FROM passages WHERE input = ?", (ident,))
    db.execute("DELETE FROM passages WHERE input = ?", (ident,))
    db.execute("DELETE FROM inputs WHERE input = ?", (ident,))


def finish(db: sqlite3.Connection) -> None:
    """After passages were added or removed: merge FTS5's segments, count each word's passages again, and
    rewrite the file so that the same rows in the same order give the same bytes."""
    db.execute("INSERT INTO fts(fts) VALUES ('optimize')")  # one b-tree per term: faster queries
    db.execute(VOCAB)
    db.execute("DELETE FROM terms")
    db.execute("INSERT INTO terms SELECT term, doc FROM temp.vocab")
    db.execute("VACUUM")


@dataclass
class BuildResult:
    entry: dict  # the manifest's `index` entry
    seconds: float
    added_inputs: int  # inputs read and cut into passages in this build; the others were kept
    removed_inputs: int
    up_to_date: bool


def _reusable(path: Path, settings: dict) -> bool:
    """An earlier index file whose name's digest matches its bytes and whose settings are these."""
    if not path.is_file() or not path.name.startswith("index-") or sha256_file(path)[:12] != path.stem[6:]:
        return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return dict(db.execute("SELECT key, value FROM meta")) == settings
    except sqlite3.Error:
        return False


def build_index(data_dir: str | Path, passage_chars: int = PASSAGE_CHARS, force: bool = False,
                base: str | Path | None = None, text_field: str = "text") -> BuildResult:
    """Build or update the prepared folder's index of its train passages, and record it in its manifest.

    An earlier index with the same settings (the manifest's, `base`, or another `index-*.sqlite` in the folder)
    is copied and updated: passages of inputs that are gone or changed are removed, new inputs are read and
    added, inputs already indexed are not read again. `force` builds anew."""
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if passage_chars < 16:
        raise DataError(f"--passage-chars {passage_chars} must be >= 16, e.g. {PASSAGE_CHARS} (about 128 tokens)")
    settings = {"format": FORMAT, "retriever": RETRIEVER, "passage_chars": str(passage_chars),
                "val_fraction": str(manifest["val_fraction"]), "split_chars": str(manifest["split_chars"]),
                "chunk_chars": str(manifest["chunk_chars"]), "text_field": text_field}
    old = manifest.get("index")
    if base is not None and Path(base).is_dir():
        entry = read_manifest(base).get("index")
        base = Path(base) / entry["file"] if entry else None
    candidates = ([data_dir / old["file"]] if old else []) + ([Path(base)] if base else []) + sorted(
        data_dir.glob("index-*.sqlite"), key=lambda f: f.stat().st_mtime, reverse=True)
    start = None if force else next((c for c in candidates if _reusable(c, settings)), None)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".index.", suffix=".tmp")
    os.close(fd)
    try:
        if start is not None:
            shutil.copyfile(start, tmp)
            db = sqlite3.connect(tmp, isolation_level=None)
        else:
            db = sqlite3.connect(tmp, isolation_level=None)
            db.executescript(SCHEMA)
            db.executemany("INSERT INTO meta VALUES (?, ?)", settings.items())
        db.execute("BEGIN")
        have = dict(db.execute("SELECT input, sha256 FROM inputs"))
        rule, wanted, added = SplitRule(manifest["val_fraction"]), set(), 0
        for spec, ident, sha, read in read_inputs(data_dir, manifest, text_field):
            wanted.add(ident)
            if have.get(ident) == sha:
                continue
            if ident in have:
                _remove(db, ident)
            rows = passages(chunks(read(), rule, manifest["split_chars"], Stats()), passage_chars)
            _insert(db, spec, ident, sha, rows)
            added += 1
        gone = [ident for ident in have if ident not in wanted]
        for ident in gone:
            _remove(db, ident)
        db.execute("COMMIT")
        n = db.execute("SELECT count(*) FROM passages").fetchone()[0]
        if added or gone:
            finish(db)
        db.close()
        if n == 0:
            raise DataError(f"the train split of {data_dir} holds no text to index; prepare a corpus with text")
        sha = sha256_file(tmp)
        entry = {"format": FORMAT, "retriever": RETRIEVER, "file": f"index-{sha[:12]}.sqlite", "sha256": sha,
                 "bytes": os.path.getsize(tmp), "passages": n, "passage_chars": passage_chars,
                 "inputs": len(wanted)}
        commit(tmp, data_dir / entry["file"])
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    up_to_date = old == entry
    if not up_to_date:  # the manifest is replaced last: a reader sees the old index or the new one
        write_atomic(data_dir / "manifest.json", json.dumps({**read_manifest(data_dir), "index": entry}, indent=1))
    for stale in data_dir.glob("index-*.sqlite"):
        if stale.name != entry["file"]:
            stale.unlink()
    return BuildResult(entry, time.perf_counter() - t0, added, len(gone), up_to_date)


def index_path(data_dir: str | Path) -> Path | None:
    """The index file named by a prepared folder's manifest; None when it has none."""
    entry = read_manifest(data_dir).get("index")
    return Path(data_dir) / entry["file"] if entry else None


# Searching


def words(text: str) -> list[str]:
    """The distinct words of free text as FTS5's unicode61 tokenizer cuts them: runs of letters and digits
    (`_` separates), lowercased, diacritics removed."""
    folded = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    return list(dict.fromkeys(re.findall(r"[^\W_]+", folded)))


class Index:
    """A read-only index file. Thread-safe: each thread gets its own connection."""

    def __init__(self, path: str | Path, sha256: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"no retrieval index at {self.path}; run `gptmini index DATA_DIR` to build it")
        self.sha256 = sha256 or sha256_file(self.path)
        self.bytes = self.path.stat().st_size
        self._local = threading.local()
        self.passages = self._db().execute("SELECT count(*) FROM passages").fetchone()[0]
        self.meta = dict(self._db().execute("SELECT key, value FROM meta"))
        # An index of the first format, registered with an earlier version, has no `terms` table.
        stored = self._db().execute("SELECT 1 FROM sqlite_schema WHERE name = 'terms'").fetchone()
        self._documents_sql = ("SELECT term, documents FROM terms" if stored else "SELECT term, doc FROM temp.vocab") \
            + " WHERE term = ?"

    @classmethod
    def of(cls, data_dir: str | Path) -> Index:
        entry = read_manifest(data_dir).get("index")
        if not entry:
            raise DataError(f"{data_dir} has no retrieval index; run `gptmini index {data_dir}` first")
        return cls(Path(data_dir) / entry["file"], entry["sha256"])

    @classmethod
    def open(cls, path: str | Path) -> Index:
        """A prepared folder's index, or an index file."""
        return cls.of(path) if Path(path).is_dir() else cls(path)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True,
                                                  check_same_thread=False)
            db.execute(VOCAB)
        return db

    def match(self, text: str, max_postings: int | None = MAX_POSTINGS) -> str:
        """The FTS5 MATCH expression for free text: its rarest words, OR-ed, as many as hold `max_postings`
        passages in all (at least one; ties by the word; None: every word), so a query scores a bounded number
        of passages. Words in no passage are left out; "" when none is left."""
        db, counts = self._db(), {}
        for w in words(text):
            row = db.execute(self._documents_sql, (w,)).fetchone()
            if row:
                counts[w] = row[1]
        kept, total = [], 0
        for w in sorted(counts, key=lambda w: (counts[w], w)):
            if kept and max_postings is not None and total + counts[w] > max_postings:
                break
            kept.append(w)
            total += counts[w]
        return " OR ".join(f'"{w}"' for w in kept)

    def search(self, query: str, k: int = 1, exclude_document: str | None = None,
               max_postings: int | None = MAX_POSTINGS) -> list[Passage]:
        """The k best passages for `query` by BM25 over its words that `match` keeps (ties by document and
        offset, so an updated index ranks as one built anew), none of `exclude_document`."""
        if not 1 <= k <= MAX_K:
            raise UserError(f"k={k} is out of range; use 1 to {MAX_K}")
        expr = self.match(query, max_postings)
        if not expr:
            return []
        # FTS5 ranks alone, and only the best n rows are joined to their passages (joining every match took
        # half the time). n grows until the k-th kept row scores strictly better than the worst of the n, so
        # no row left out could tie with it or be excluded into the top k.
        n = k + 1
        while True:
            rows = self._db().execute(
                "SELECT p.rowid, p.document, p.offset, p.source, p.text, -r.score FROM (SELECT rowid, bm25(fts) "
                "AS score FROM fts WHERE fts MATCH ? ORDER BY score LIMIT ?) r JOIN passages p ON p.rowid = r.rowid",
                (expr, n)).fetchall()
            kept = sorted((r for r in rows if r[1] != exclude_document), key=lambda r: (-r[5], r[1], r[2]))
            if len(rows) < n or (len(kept) >= k and kept[k - 1][5] > min(r[5] for r in rows)):
                break
            n *= 4
        return [Passage(f"p{r[0]}", r[1], r[2], r[3], r[4], float(r[5])) for r in kept[:k]]

    def documents(self) -> dict[str, int]:
        """Passages per document."""
        return dict(self._db().execute("SELECT document, count(*) FROM passages GROUP BY document"))

    def random(self, rng: random.Random) -> Passage:
        rowid = self._db().execute("SELECT rowid FROM passages LIMIT 1 OFFSET ?",
                                   (rng.randrange(self.passages),)).fetchone()[0]
        r = self._db().execute("SELECT rowid, document, offset, source, text FROM passages WHERE rowid = ?",
                               (rowid,)).fetchone()
        return Passage(f"p{r[0]}", r[1], r[2], r[3], r[4])


# The In-Context RALM context


def query_of(tokenizer: Tokenizer, ids: list[int], n: int = QUERY_TOKENS) -> str:
    """The retrieval query: the text of the last `n` tokens (end-of-text dropped)."""
    return tokenizer.decode([t for t in ids[-n:] if t != tokenizer.eot_token])


def build_context(tokenizer: Tokenizer, passages: list[list[int]], prefix: list[int], budget: int) -> list[int]:
    """[eot] passage_k ... [eot] passage_1 [eot] prefix, from passages' token ids, best first: the best next to
    the prefix (In-Context RALM), each cut at its end to fit `budget` tokens in all. `prefix` starts with its
    own end-of-text, as every prompt does, and keeps its last `budget` tokens if it is longer."""
    eot = tokenizer.eot_token
    prefix = prefix[-budget:]
    room, parts = budget - len(prefix), []
    for ids in passages:
        if room < 2:
            break
        ids = ids[: room - 1]
        parts.insert(0, [eot] + ids)
        room -= len(ids) + 1
    return [t for part in parts for t in part] + prefix
