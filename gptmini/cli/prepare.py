"""`gptmini prepare SOURCE... --out DIR`: text → tiktoken ids → uint32 Arrow IPC shards + manifest.json."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from gptmini.cli import run
from gptmini.cli.index import index_summary
from gptmini.data.prepare import SHARD_TOKENS, SPLIT_CHARS, PrepareConfig, Result, prepare
from gptmini.data.sources import HttpOptions, default_cache_dir
from gptmini.retrieval import build_index
from gptmini.tokenizer import DEFAULT_TOKENIZER, KNOWN


def parse_args(argv: list[str]) -> tuple[PrepareConfig, bool]:
    p = argparse.ArgumentParser(
        prog="gptmini prepare",
        description="Tokenize text sources into verified uint32 Arrow token shards plus manifest.json.",
        epilog="SOURCE: wikipedia:TITLE | http(s)://URL | embedded:python-docs | FILE | FOLDER | 'GLOB' "
        "(.txt .md .jsonl .parquet). Downloads are cached in --cache-dir by sha256.",
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE")
    p.add_argument("--out", required=True, type=Path, help="output folder (manifest.json + *.arrow)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help=f"a tiktoken encoding ({', '.join(KNOWN)}), or bpe:N to train a byte-level BPE of N ids on "
                   "the train split (saved as tokenizer.tiktoken beside the shards)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the text held out for validation, dealt in chunks of --split-chars")
    p.add_argument("--split-chars", type=int, default=SPLIT_CHARS,
                   help="characters per chunk dealt to train or val (cut at tokenizer-safe points)")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="most tokens per shard")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (1: inline)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl lines / column of .parquet")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="download cache ($GPTMINI_CACHE_DIR)")
    p.add_argument("--wikipedia-api", default=HttpOptions().wikipedia_api, help="MediaWiki api.php URL "
                   "($GPTMINI_WIKIPEDIA_API)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    p.add_argument("--retries", type=int, default=5, help="HTTP retries on 429/5xx and connection errors")
    p.add_argument("--backoff", type=float, default=0.5, help="HTTP backoff factor (seconds)")
    p.add_argument("--refresh", action="store_true", help="re-download URLs even if cached")
    p.add_argument("--force", action="store_true", help="rewrite the shards even if they are up to date")
    p.add_argument("--since", type=Path, default=None, metavar="DATASET",
                   help="an earlier prepared folder (or its manifest.json): the manifest marks the inputs that are "
                        "new since it, for training on new text with replay and for the gate's new/old measures")
    p.add_argument("--index", action="store_true",
                   help="also build the retrieval index of the train split's passages (as `gptmini index OUT`)")
    a = p.parse_args(argv)
    http = HttpOptions(timeout=a.timeout, retries=a.retries, backoff=a.backoff, wikipedia_api=a.wikipedia_api)
    return PrepareConfig(
        sources=a.sources, out=a.out, tokenizer=a.tokenizer, val_fraction=a.val_fraction,
        split_chars=a.split_chars, shard_tokens=a.shard_tokens, workers=a.workers, text_field=a.text_field, cache_dir=a.cache_dir,
        http=http, refresh=a.refresh, force=a.force, since=a.since,
    ), a.index


def summary(res: Result, out: Path) -> str:
    m = res.manifest
    if res.up_to_date:
        return f"{out}/manifest.json is up to date (input_key {m['input_key'][:12]}); nothing to do"
    s, tr, va = m["stats"], m["splits"]["train"], m["splits"]["val"]
    mchars = res.text_chars / 1e6
    return (
        f"wrote {out}: {m['documents']} documents, {m['tokenizer']} tokens; train {tr['tokens']:,} tokens "
        f"({tr['chunks']} chunks, {len(tr['shards'])} shards), val {va['tokens']:,} tokens ({va['chunks']} chunks, "
        f"{len(va['shards'])} shards); "
        f"skipped {s['empty_documents']} empty document(s), replaced {s['replaced_bytes']} non-UTF-8 byte(s); "
        f"tokenized {res.tokenized_inputs} of {len(m['inputs'])} input(s) ({mchars:.1f}M characters) in "
        f"{res.seconds:.1f}s with {res.workers} tokenizer process(es), the rest from the token cache"
        + (f"; new since {m['since']['input_key'][:12]}: {m['since']['new_inputs']} input(s), "
           f"{m['since']['new_documents']} document(s)" if "since" in m else "")
    )


def prepare_and_index(cfg: PrepareConfig, index: bool) -> None:
    print(summary(prepare(cfg), cfg.out))
    if index:
        # The earlier dataset's index (in its folder, or beside its manifest.json) is updated with the new
        # inputs rather than all of them read again.
        base = None if cfg.since is None else cfg.since if Path(cfg.since).is_dir() else Path(cfg.since).parent
        print(index_summary(build_index(cfg.out, base=base, text_field=cfg.text_field), cfg.out))


def main(argv: list[str] | None = None) -> int:
    cfg, index = parse_args(argv)
    return run("gptmini prepare", lambda: prepare_and_index(cfg, index))
