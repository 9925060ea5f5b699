"""What the query's word budget costs and gives: SQLite FTS5 at 200 MB, keeping a query's rarest words up to
N passages in all (`retrieval.MAX_POSTINGS`), against keeping every word.

The generated corpus of bench_retrieval.py (words drawn from the demo corpus's word frequencies, so no topics
and only a few thousand distinct words: every word of a query is in thousands of passages, the worst case for
the budget). Two kinds of queries of 32 cl100k tokens: held-out text (the latency), and known items, 32 tokens
cut from inside an indexed passage, whose own passage is the one right answer (recall@1 and @5). Prints one
markdown table with the load average.

    .venv/bin/python bench/bench_retrieval_budget.py --generated-mb 200 --queries 100
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench_retrieval import build_fts5, demo_corpus, generated_corpus, latency_ms
from gptmini import retrieval
from gptmini.tokenizer import get_tokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--generated-mb", type=int, default=200)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--budgets", default="10000,20000,40000,80000,every")
    args = p.parse_args()
    tok = get_tokenizer("cl100k_base")
    demo_passages, _ = demo_corpus()
    passages, val = generated_corpus(args.generated_mb, " ".join(t for _, _, t in demo_passages))
    rng = random.Random(0)
    held_out = [tok.decode(tok.encode(v)[:retrieval.QUERY_TOKENS]) for v in val[:args.queries]]
    known = [(d, off, tok.decode(tok.encode(text)[20:20 + retrieval.QUERY_TOKENS]))
             for d, off, text in rng.sample(passages, args.queries)]
    folder = Path(tempfile.mkdtemp(prefix="bench-retrieval-budget-"))
    try:
        path, _ = build_fts5(passages, folder)
        index = retrieval.Index(path, sha256="-")
        print(f"| words kept | query p50 ms | query p99 ms | known-item recall@1 | recall@5 | load avg |")
        print("|---|---|---|---|---|---|")
        for budget in args.budgets.split(","):
            limit = None if budget == "every" else int(budget)
            p50, p99 = latency_ms(lambda q: index.search(q, 1, None, limit), held_out)
            ranked = [[(p.document, p.offset) for p in index.search(q, 5, None, limit)] for _, _, q in known]
            at1 = np.mean([(d, off) in r[:1] for (d, off, _), r in zip(known, ranked)])
            at5 = np.mean([(d, off) in r for (d, off, _), r in zip(known, ranked)])
            load = "/".join(f"{x:.1f}" for x in os.getloadavg())
            name = "every word" if limit is None else f"rarest, up to {limit:,} passages"
            print(f"| {name} | {p50:.1f} | {p99:.1f} | {at1:.2f} | {at5:.2f} "
                  f"| {load} |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
