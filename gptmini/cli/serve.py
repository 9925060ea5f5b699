"""`gptmini serve`: an OpenAI-compatible endpoint for a checkpoint or a registry version (gptmini/server/)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from gptmini import quantize
from gptmini.cli import run
from gptmini.retrieval import MAX_K
from gptmini.cli.source import add_model_source
from gptmini.device import pick_device
from gptmini.errors import MissingPathError, UserError
from gptmini.registry import parse_model_uri
from gptmini.server.app import serve as run_server
from gptmini.server.config import ServeConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gptmini serve",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions), "
                    "continuously batched. With --model models:/NAME@ALIAS it follows the alias: a promotion "
                    "swaps the served version within --poll-interval seconds.")
    add_model_source(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV cache slots)")
    p.add_argument("--prefill-chunk", type=int, default=96,
                   help="prompt tokens prefilled per decode step, in the decode's forward, so a long prompt does "
                        "not stall the running streams; 0 prefills each prompt whole (BENCHMARKS.md)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429s")
    p.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask for")
    p.add_argument("--poll-interval", type=float, default=10.0, help="seconds between looks at the alias")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1 (default: $GPTMINI_API_KEY; none if unset)")
    p.add_argument("--served-name", default="gptmini", help="the model id of a --checkpoint in responses")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quantize", default="none", choices=quantize.MODES, help="int8: weight-only int8 matmuls")
    p.add_argument("--index", help="with --checkpoint: its retrieval index (a prepared folder or an index file); a "
                   "registry version brings its own")
    p.add_argument("--retrieval", type=int, default=0, metavar="K", help="read the K best passages before every "
                   "prompt unless a request sends `retrieval: false` (default 0: only when a request asks)")
    args = p.parse_args(argv)
    if args.index and args.model:
        p.error("--index goes with --checkpoint; a registry version brings the index it was registered with")
    if not 0 <= args.retrieval <= MAX_K:
        p.error(f"--retrieval={args.retrieval} is out of range; use 0 (off) to {MAX_K}")
    for name in ("max_batch", "max_queue", "max_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.prefill_chunk < 0:
        p.error(f"--prefill-chunk={args.prefill_chunk} must be >= 0 (0 prefills each prompt whole)")
    if not 0 < args.port < 65536:
        p.error(f"--port={args.port} must be between 1 and 65535")
    if args.poll_interval <= 0:
        p.error(f"--poll-interval={args.poll_interval} must be > 0 seconds")
    return args


def serve(args: argparse.Namespace) -> None:
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise MissingPathError(f"--checkpoint {args.checkpoint} does not exist; pass a run folder, final/ or a "
                               "weights folder (or --model models:/gptmini@production)")
    if args.model:
        parse_model_uri(args.model)
    api_key = args.api_key or os.environ.get("GPTMINI_API_KEY") or None
    if api_key is not None and len(api_key) < 8:
        raise UserError("the API key is shorter than 8 characters; use a longer random one "
                        "(e.g. `openssl rand -hex 16`)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_server(ServeConfig(
        checkpoint=Path(args.checkpoint) if args.checkpoint else None, model_uri=args.model, host=args.host,
        port=args.port, served_name=args.served_name, max_batch=args.max_batch, max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        max_tokens=args.max_tokens, poll_interval=args.poll_interval, api_key=api_key,
        max_body_bytes=args.max_body_bytes, device=str(pick_device(args.device)), quantize=args.quantize,
        index=Path(args.index) if args.index else None, retrieval_k=args.retrieval))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run("gptmini serve", lambda: serve(args))
