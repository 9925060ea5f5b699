"""Data pipeline throughput, on the same text in one run (documents of 20 KB cut from the Python reference):

1. `gptmini prepare` (read files, split, tokenize, write verified shards) against raw tiktoken
   `encode_ordinary_batch` on the same documents in memory, with 1 and N processes (vs raw: raw's wall time over
   this one's, raw at num_threads = workers; cpu/raw the same for CPU seconds, less sensitive to other load).
2. The training loader (`build_loaders(...).next_batch()`) against nanoGPT's `get_batch` (np.memmap re-opened
   per batch, random offsets, torch.stack): B x T batches per second on CPU.
3. With --incremental-mb: that corpus prepared, grown by --new-share new documents, prepared again `--since` the
   first: the characters tokenized the second time, and the time.

    python bench/bench_data.py --mb 32 --workers 1 2
    python bench/bench_data.py --incremental-mb 200 --new-share 0.01 --workers 2 --only-incremental
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tiktoken
from pydoc_data import topics

from gptmini.data.prepare import PrepareConfig, prepare
from gptmini.files import write_json
from gptmini.tokenizer import get_tokenizer

from common import environment, fmt, md_table

# torch is imported only inside the loader benchmark: prepare's worker processes are spawned, and spawn
# re-imports this __main__ module in each of them (as it would a training script's).


def make_corpus(root: Path, mb: float, doc_kb: int = 20) -> list[str]:
    """Documents of about doc_kb KB cut from the Python reference, repeated to `mb` MB, one .txt file each."""
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    docs, size = [], 0
    root.mkdir()
    while size < mb * 1e6:
        start = (len(docs) * 7919 * 13) % (len(text) - doc_kb * 1000)  # varied cuts, so documents differ
        docs.append(f"[{len(docs)}] " + text[start : start + doc_kb * 1000])
        size += len(docs[-1].encode())
        (root / f"{len(docs) - 1:06d}.txt").write_text(docs[-1])
    return docs


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the spawned tokenizer workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def interleaved_best(repeats: int, fns: dict[str, callable]) -> dict[str, tuple[float, float]]:
    """Best wall and CPU seconds of each function, running them in turn each round: load on a shared machine
    drifts, and this spreads the drift over all of them instead of penalising whichever ran last."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), cpu_seconds()
            fn()
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def bench_prepare(mb: float, workers: list[int], repeats: int) -> list[dict]:
    tok = get_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = make_corpus(root / "corpus", mb)
        n_bytes = sum(len(d.encode()) for d in docs)
        n_tokens = sum(len(t) for t in tok.enc.encode_ordinary_batch(docs, num_threads=os.cpu_count()))

        def run_prepare(w: int) -> None:
            shutil.rmtree(root / "out", ignore_errors=True)
            shutil.rmtree(root / "cache", ignore_errors=True)  # tokenize everything: no tokens kept from the last round
            res = prepare(PrepareConfig([str(root / "corpus")], root / "out", workers=w, cache_dir=root / "cache",
                                      inline_bytes=0))  # the workers asked for, whatever the size
            m = res.manifest["splits"]
            # Every token, and a boundary token per document at least (a document cut into val pieces has more).
            assert res.workers == w and m["train"]["tokens"] + m["val"]["tokens"] >= n_tokens + len(docs)

        # Raw baselines at each thread count, and the tightest single-thread one: no pool, one call per document.
        fns = {f"raw encode_ordinary_batch, num_threads={t}":
               (lambda t=t: tok.enc.encode_ordinary_batch(docs, num_threads=t)) for t in sorted({1, *workers})}
        fns["raw [encode_ordinary(d) for d in docs]"] = lambda: [tok.enc.encode_ordinary(d) for d in docs]
        fns |= {f"gptmini prepare --workers {w} (files -> verified shards)": (lambda w=w: run_prepare(w))
                for w in workers}
        best = interleaved_best(repeats, fns)
    raw = {int(name.rsplit("=", 1)[1]): cpu_and_wall for name, cpu_and_wall in best.items() if "num_threads=" in name}
    one = next((t for name, (t, _) in best.items() if name.startswith("gptmini prepare --workers 1 ")), None)
    rows = []
    for name, (t, cpu) in best.items():
        if "num_threads=" in name:
            n = int(name.rsplit("=", 1)[1])
        else:
            n = 1 if name.startswith("raw") else int(name.split()[3])
        rows.append({"what": name, "seconds": t, "cpu_seconds": cpu, "MB/s": n_bytes / t / 1e6,
                     "tokens/s": n_tokens / t, "workers": n, "MB": n_bytes / 1e6, "tokens": n_tokens,
                     "vs raw (same workers/threads)": raw[n][0] / t, "cpu vs raw": raw[n][1] / cpu,
                     "scaling vs prepare 1 process": one / t if one and name.startswith("gptmini") else None})
    return rows


def bench_incremental(mb: float, new_share: float, workers: int) -> dict:
    """A corpus of `mb` MB prepared once, then again after `new_share` of new text was added (prepare --since the
    first dataset): the characters tokenized, the CPU and wall time of each run, and their ratios. The second
    run still reads and hashes every input and writes every shard; only tokenizing is skipped for what the
    token cache holds."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = make_corpus(root / "corpus", mb)
        total = sum(len(d) for d in docs)

        def run(out: str, since: Path | None = None):
            t0, c0 = time.perf_counter(), cpu_seconds()
            res = prepare(PrepareConfig([str(root / "corpus")], root / out, workers=workers, cache_dir=root / "cache",
                                        since=since))
            return res, time.perf_counter() - t0, cpu_seconds() - c0

        first, wall1, cpu1 = run("v1")
        n_new = max(1, round(len(docs) * new_share))
        for j in range(n_new):  # new documents: other cuts of the same text, new names
            (root / "corpus" / f"new-{j:06d}.txt").write_text(f"[new {j}] " + docs[(j * 37) % len(docs)][::-1])
        second, wall2, cpu2 = run("v2", root / "v1")
    return {"MB": mb, "documents": len(docs), "new_documents": n_new, "workers": workers,
            "first": {"seconds": wall1, "cpu_seconds": cpu1, "tokenized_chars": first.text_chars,
                      "tokenized_inputs": first.tokenized_inputs},
            "second": {"seconds": wall2, "cpu_seconds": cpu2, "tokenized_chars": second.text_chars,
                       "tokenized_inputs": second.tokenized_inputs,
                       "new_inputs": second.manifest["since"]["new_inputs"]},
            "tokenized_share": second.text_chars / (total + second.text_chars),
            "wall_ratio": wall2 / wall1, "cpu_ratio": cpu2 / cpu1}


def nanogpt_get_batch(path: str, n: int, batch_size: int, block_size: int):
    import torch

    # nanoGPT train.py: re-create the memmap every batch to avoid a memory leak; uint32 since cl100k > 65535
    data = np.memmap(path, dtype=np.uint32, mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i : i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + block_size]).astype(np.int64)) for i in ix])
    return x, y


def bench_loader(mb: float = 8, shapes=((8, 1024), (32, 256), (64, 2048)), seconds: float = 3) -> list[dict]:
    from gptmini.data.loader import TokenShards, build_loaders

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root / "corpus", mb)
        prepare(PrepareConfig([str(root / "corpus")], root / "out", workers=os.cpu_count() or 1, cache_dir=root / "c"))
        tokens = TokenShards.open(root / "out", "train")
        raw = root / "train.bin"
        np.asarray(tokens[0 : len(tokens)]).tofile(raw)
        for batch_size, seq_len in shapes:
            train, _ = build_loaders(root / "out", seq_len=seq_len, stride=seq_len // 2, batch_size=batch_size, seed=0)
            for name, fn in [
                ("gptmini WindowLoader.next_batch", train.next_batch),
                ("nanoGPT np.memmap get_batch", lambda: nanogpt_get_batch(str(raw), len(tokens), batch_size, seq_len)),
            ]:
                for _ in range(20):
                    fn()
                n, t0 = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - t0) < seconds:
                    for _ in range(50):
                        fn()
                    n += 50
                rows.append({"what": name, "B": batch_size, "T": seq_len, "batches/s": n / elapsed,
                             "tokens/s": n * batch_size * seq_len / elapsed})
    nanogpt = {(r["B"], r["T"]): r["tokens/s"] for r in rows if r["what"].startswith("nanoGPT")}
    return [r | {"vs nanoGPT": r["tokens/s"] / nanogpt[r["B"], r["T"]]} for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=32.0, help="corpus size for the prepare benchmark")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--incremental-mb", type=float, default=0.0, help="also the incremental benchmark, on this many MB")
    p.add_argument("--new-share", type=float, default=0.01)
    p.add_argument("--only-incremental", action="store_true")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    env = environment(tiktoken=tiktoken.__version__, numpy=np.__version__, pyarrow=__import__("pyarrow").__version__)
    print(json.dumps(env))
    out = {"env": env}
    if a.incremental_mb:
        inc = out["incremental"] = bench_incremental(a.incremental_mb, a.new_share, max(a.workers))
        print(f"\nincremental prepare: {a.incremental_mb:g} MB ({inc['documents']} documents), then "
              f"{inc['new_documents']} new documents ({a.new_share:.0%}) prepared --since the first, "
              f"{inc['workers']} workers")
        print(md_table(["run", "inputs tokenized", "M chars tokenized", "wall s", "cpu s"], [
            [n, inc[n]["tokenized_inputs"], f"{inc[n]['tokenized_chars'] / 1e6:.2f}", f"{inc[n]['seconds']:.1f}",
             f"{inc[n]['cpu_seconds']:.1f}"] for n in ("first", "second")]))
        share = inc["second"]["tokenized_chars"] / inc["first"]["tokenized_chars"]
        print(f"second/first: tokenized characters {share:.4f}, "
              f"wall {inc['wall_ratio']:.3f}, cpu {inc['cpu_ratio']:.3f}")
    if not a.only_incremental:
        out["prepare"] = bench_prepare(a.mb, a.workers, a.repeats)
        print(f"\nprepare: {a.mb:g} MB of text in 20 KB documents (best of {a.repeats})")
        print(md_table(["", "wall s", "cpu s", "MB/s", "Mtok/s", "vs raw", "cpu/raw", "scaling"], [
            [r["what"], f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}", f"{r['MB/s']:.2f}",
             f"{r['tokens/s'] / 1e6:.3f}", f"{r['vs raw (same workers/threads)']:.2f}", f"{r['cpu vs raw']:.2f}",
             fmt(r["scaling vs prepare 1 process"], ".2f")] for r in out["prepare"]]))
        out["loader"] = bench_loader()
        print("\nloader: shuffled B x T batches on CPU, 8 MB corpus")
        print(md_table(["", "B", "T", "batches/s", "Mtok/s", "vs nanoGPT"], [
            [r["what"], r["B"], r["T"], f"{r['batches/s']:.0f}", f"{r['tokens/s'] / 1e6:.1f}", f"{r['vs nanoGPT']:.2f}"]
            for r in out["loader"]]))
    if a.json:
        write_json(a.json, out)


if __name__ == "__main__":
    main()
