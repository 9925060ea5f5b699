"""`gptmini generate`: stream text from a checkpoint or a registered model."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

from gptmini import quantize
from gptmini.cli import run
from gptmini import rag
from gptmini.cli.source import add_model_source, add_retrieval, load_index, load_model_source, retrieval_options
from gptmini.device import pick_device
from gptmini.engine import TextStream, check_sampling, prompt_ids, sampling_mask
from gptmini.generate import stream
from gptmini.tokenizer import Tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gptmini generate", description="Stream text from a trained gptmini model.")
    add_model_source(p)
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: empty prompt)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quantize", default="none", choices=quantize.MODES,
                   help="int8: weight-only int8 for every matmul weight and the experts (see BENCHMARKS.md)")
    add_retrieval(p)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    return args


def generate(args: argparse.Namespace) -> None:
    check_sampling(args.temperature, args.top_k, args.top_p)
    device = pick_device(args.device)
    model, tok = load_model_source(args, device=device)
    model = quantize.apply(model, args.quantize)
    prompts = [prompt_ids(tok, text) for text in (args.prompt or [""])]
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    if args.rag:
        return generate_rag(args, model, tok, prompts, generator)
    tokens = stream(
        model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        eos_token_id=tok.eot_token, use_cache=not args.no_cache, generator=generator,
        allowed=sampling_mask(tok, model.config.vocab_size, device),
    )
    if len(prompts) == 1:
        print_stream(tok, args.prompt[0] if args.prompt else "", tokens)
    else:
        print_batch(tok, args.prompt, tokens)


def generate_rag(args: argparse.Namespace, model, tok: Tokenizer, prompts: list[list[int]], generator) -> None:
    """Each prompt continued after the passages retrieved for it, then the passages it cites."""
    opts = retrieval_options(args)
    rag.check_options(opts)
    index = load_index(args)
    complete = rag.model_complete(model, tok, args.temperature, args.top_k, args.top_p, generator)
    for i, (text, ids) in enumerate(zip(args.prompt or [""], prompts)):
        result = rag.generate(index, tok, ids, args.max_new_tokens, complete, model.config.max_seq_len, opts)
        new = [t for t in result.ids if t != tok.eot_token]
        print((f"--- [{i}]\n" if len(prompts) > 1 else "") + text + tok.decode(new))
        for n, p in enumerate(result.citations, 1):
            print(f"  [{n}] {p.document} @{p.offset} ({p.source}, {p.id}, score {p.score:.2f})")


def print_stream(tok: Tokenizer, prompt: str, tokens: Iterator[Tensor]) -> None:
    text = TextStream(tok)  # whole characters only: one can span several tokens
    sys.stdout.write(prompt)
    for column in tokens:
        t = int(column[0])
        if t == tok.eot_token:
            break
        sys.stdout.write(text.push(t)[0])
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")


def print_batch(tok: Tokenizer, prompts: list[str], tokens: Iterator[Tensor]) -> None:
    rows = torch.stack(list(tokens), dim=1).tolist()  # (B, new)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        if tok.eot_token in row:
            row = row[: row.index(tok.eot_token)]
        print(f"--- [{i}]\n{prompt}{tok.decode(row)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run("gptmini generate", lambda: generate(args))
