"""Which retriever: SQLite FTS5, bm25s and tantivy on the same passages.

For each corpus (the embedded CPython docs the demo trains on; with --generated-mb, a generated one whose words
follow the demo corpus's frequencies) the train passages are cut as `gptmini index` cuts them; each retriever
builds its index (seconds, bytes on disk) and answers the same queries (the first 32 cl100k tokens of each val
piece): p50 and p99 latency of a top-1 query, with the load average (the machine may be shared).

--budgets instead prices FTS5's query word budget on the generated corpus (a few thousand distinct words, so
every query word is in thousands of passages: the budget's worst case): keeping a query's rarest words up to N
passages (`retrieval.MAX_POSTINGS`) against every word. Latency over held-out queries; recall@1 and @5 of 32
tokens cut from inside an indexed passage, whose own passage is the one right answer.

    .venv/bin/python bench/bench_retrieval.py --generated-mb 200
    .venv/bin/python bench/bench_retrieval.py --generated-mb 200 --queries 100 --budgets 10000,20000,40000,80000,every
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from gptmini import retrieval
from gptmini.data.prepare import SplitRule
from gptmini.data.sources import Stats, open_source, split_text
from gptmini.tokenizer import get_tokenizer

from common import md_table, names


def demo_corpus() -> tuple[list[tuple[str, int, str]], list[str]]:
    chunks = list(retrieval.chunks(open_source("embedded:python-docs").documents, SplitRule(0.05), 1024, Stats()))
    return list(retrieval.passages(chunks)), [text for _, text in retrieval.val_runs(chunks)]


def generated_corpus(mb: int, demo_text: str, seed: int = 0) -> tuple[list[tuple[str, int, str]], list[str]]:
    """Documents of 2-20 KB whose words are drawn from the demo corpus's word frequencies."""
    counts = Counter(re.findall(r"\S+", demo_text))
    words, freq = list(counts), np.array(list(counts.values()), dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.choice(len(words), size=mb * (1 << 20) // 6, p=freq / freq.sum())
    passages, val, pos, doc, total = [], [], 0, 0, 0
    while pos < len(draws) and total < mb << 20:
        n = int(rng.integers(300, 3000))
        text = " ".join(words[i] for i in draws[pos:pos + n])
        pos, doc, total = pos + n, doc + 1, total + len(text)
        if doc % 20 == 0:
            val.append(text[:1024])
            continue
        off = 0
        for piece in split_text(text, retrieval.PASSAGE_CHARS):
            passages.append((f"gen/{doc}", off, piece))
            off += len(piece)
    return passages, val


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def build_fts5(passages, folder: Path):
    path = folder / "fts5.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(retrieval.SCHEMA)
    db.execute("BEGIN")
    retrieval._insert(db, "bench", "bench", "-", passages)
    db.execute("COMMIT")
    retrieval.finish(db)
    db.close()
    index = retrieval.Index(path, sha256="-")
    return path, lambda q: index.search(q, 1)


def build_bm25s(passages, folder: Path):
    import bm25s

    path = folder / "bm25s"
    tokens = bm25s.tokenize([p[2] for p in passages], stopwords=None, show_progress=False)
    model = bm25s.BM25()
    model.index(tokens, show_progress=False)
    model.save(path)
    model = bm25s.BM25.load(path)

    def search(q):
        qt = bm25s.tokenize([q], stopwords=None, show_progress=False)
        return model.retrieve(qt, k=1, show_progress=False)
    return path, search


def build_tantivy(passages, folder: Path):
    import tantivy

    path = folder / "tantivy"
    path.mkdir()
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("text", stored=True)
    sb.add_integer_field("rowid", stored=True)
    schema = sb.build()
    index = tantivy.Index(schema, path=str(path))
    writer = index.writer()
    for i, p in enumerate(passages):
        writer.add_document(tantivy.Document(text=p[2], rowid=i))
    writer.commit()
    writer.wait_merging_threads()
    index.reload()
    searcher = index.searcher()

    def search(q):
        words = " OR ".join(dict.fromkeys(w.lower() for w in re.findall(r"[^\W_]+", q)))
        return searcher.search(index.parse_query(words, ["text"]), 1).hits if words else []
    return path, search


RETRIEVERS = {"sqlite-fts5": build_fts5, "bm25s": build_bm25s, "tantivy": build_tantivy}


def latency_ms(search, queries) -> tuple[float, float]:
    """p50 and p99 milliseconds of `search(q)` over the queries, after one warm-up query."""
    search(queries[0])
    times = []
    for q in queries:
        t = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - t)
    return tuple(float(np.percentile(times, q)) * 1e3 for q in (50, 99))


def budget_table(budgets: list[str], passages, val, n: int, tok) -> None:
    rng = random.Random(0)
    held_out = [tok.decode(tok.encode(v)[:retrieval.QUERY_TOKENS]) for v in val[:n]]
    known = [(d, off, tok.decode(tok.encode(text)[20:20 + retrieval.QUERY_TOKENS]))
             for d, off, text in rng.sample(passages, n)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-budget-") as folder:
        index = retrieval.Index(build_fts5(passages, Path(folder))[0], sha256="-")
        for budget in budgets:
            limit = None if budget == "every" else int(budget)
            p50, p99 = latency_ms(lambda q: index.search(q, 1, None, limit), held_out)
            ranked = [[(p.document, p.offset) for p in index.search(q, 5, None, limit)] for _, _, q in known]
            at1, at5 = (np.mean([(d, off) in r[:k] for (d, off, _), r in zip(known, ranked)]) for k in (1, 5))
            name = "every word" if limit is None else f"rarest, up to {limit:,} passages"
            rows.append([name, f"{p50:.1f}", f"{p99:.1f}", f"{at1:.2f}", f"{at5:.2f}", load_avg()])
    print(md_table(["words kept", "query p50 ms", "query p99 ms", "known-item recall@1", "recall@5", "load avg"], rows))


def load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generated-mb", type=int, default=200)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--retrievers", default=",".join(RETRIEVERS), type=names(*RETRIEVERS), help="comma list")
    p.add_argument("--budgets", help="comma list of word budgets (passages), `every` for none: the budget table")
    args = p.parse_args()
    tok = get_tokenizer("cl100k_base")
    demo_passages, demo_val = demo_corpus()
    demo_text = " ".join(t for _, _, t in demo_passages)
    if args.budgets:
        return budget_table(args.budgets.split(","), *generated_corpus(args.generated_mb, demo_text), args.queries, tok)
    corpora = {"demo (embedded python-docs)": (demo_passages, demo_val)}
    if args.generated_mb:
        corpora[f"generated {args.generated_mb} MB"] = generated_corpus(args.generated_mb, demo_text)
    rng, rows = random.Random(0), []
    for corpus, (passages, val) in corpora.items():
        queries = [tok.decode(tok.encode(v)[:retrieval.QUERY_TOKENS]) for v in val]
        queries = (queries * (args.queries // len(queries) + 1))[: args.queries]
        rng.shuffle(queries)
        mb = sum(len(t[2]) for t in passages) / 2**20
        for name in args.retrievers:
            with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as folder:
                t0 = time.perf_counter()
                path, search = RETRIEVERS[name](passages, Path(folder))
                build_s = time.perf_counter() - t0
                p50, p99 = latency_ms(search, queries)
                rows.append([corpus, f"{len(passages):,}", f"{mb:.1f}", name, f"{build_s:.1f}",
                             f"{dir_bytes(path) / 2**20:.1f}", f"{p50:.2f}", f"{p99:.2f}", load_avg()])
    print(md_table(["corpus", "passages", "text MB", "retriever", "build s", "index MB", "query p50 ms", "query p99 ms",
                    "load avg"], rows, "lrrlrrrrr"))


if __name__ == "__main__":
    main()
