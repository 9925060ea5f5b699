"""Sampling and `gptmini generate`.

The decoding loop runs the prompt once (prefill) and then one token per step against a preallocated KV
cache (`gptmini.model.KVCache`); `use_cache=False` recomputes the whole sequence every step instead, which
is the reference the cache is tested against. Prompts of different lengths are left-padded.
"""
from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from gptmini.model import GPTOSSMini, KVCache

Prompts = Tensor | Sequence[Sequence[int]]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1, or None to keep every token")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1], or None to keep every token")


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    allowed: Tensor | None = None,
) -> Tensor:
    """One token per row from (B, V) logits. `allowed` (V,) bool masks ids that must never be sampled."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling (Holtzman et al., 2020): the smallest set of tokens whose mass reaches top_p.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reached top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Prompts, fill: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(B, T) ids and (B,) padding counts, None when every prompt has the same length."""
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(prompts.shape)}")
        return prompts.to(device), None
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise ValueError("every prompt needs at least one token (start an empty prompt with end-of-text)")
    T = max(lengths)
    idx = torch.tensor([[fill] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    pad = torch.tensor([T - n for n in lengths], dtype=torch.long, device=device)
    return idx, (pad if pad.any() else None)


@torch.no_grad()
def stream(
    model: GPTOSSMini,
    idx: Prompts,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    allowed: Tensor | None = None,
) -> Iterator[Tensor]:
    """Yield (B,) new-token columns. A row that has emitted eos_token_id keeps emitting it; the stream ends
    when every row has, or after max_new_tokens."""
    check_sampling(temperature, top_k, top_p)
    cfg = model.config
    device = model.tok_embeddings.weight.device
    idx, pad = left_pad(idx, eos_token_id or 0, device)
    B, T = idx.shape
    total = T + max_new_tokens
    if total > cfg.max_seq_len and cfg.rope_scaling is None and cfg.sliding_window is None:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds max_seq_len={cfg.max_seq_len}; "
            f"shorten them, or set rope_scaling='ntk' or a sliding_window in the model config"
        )
    size = min(total, cfg.sliding_window or total)
    dtype = model.tok_embeddings.weight.dtype
    cache = KVCache(cfg, B, size, device, dtype) if use_cache else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        seq, step_in = idx, idx
        for _ in range(max_new_tokens):
            logits, _ = model(step_in if use_cache else seq, cache=cache, pad=pad, last_only=True, rope_len=total)
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator, allowed)  # (B,)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(finished, eos_token_id)
                finished |= nxt == eos_token_id
            yield nxt
            if eos_token_id is not None and bool(finished.all()):
                return
            step_in = nxt[:, None]
            if not use_cache:
                seq = torch.cat([seq, step_in], dim=1)
    finally:
        model.train(was_training)


def generate(model: GPTOSSMini, idx: Prompts, max_new_tokens: int = 50, **kwargs) -> Tensor | list[list[int]]:
    """A (B, T) tensor gives the (B, T + new) tensor (finished rows padded with eos), like nanoGPT and HF.
    A list of token lists gives, per prompt, the prompt + its new tokens up to and including eos."""
    columns = list(stream(model, idx, max_new_tokens, **kwargs))
    new = torch.stack(columns, dim=1) if columns else torch.empty(len(idx), 0, dtype=torch.long)
    if isinstance(idx, Tensor):
        return torch.cat([idx.to(new.device), new], dim=1)
    eos = kwargs.get("eos_token_id")
    out = []
    for prompt, row in zip(idx, new.tolist()):
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        out.append(list(prompt) + row)
    return out


def sampling_mask(tokenizer, vocab_size: int, device: torch.device) -> Tensor:
    """True for the ids the tokenizer can decode as text, plus end-of-text (never the vocab padding)."""
    allowed = torch.arange(vocab_size, device=device) < tokenizer.n_ordinary
    allowed[tokenizer.eot_token] = True
    return allowed


def load_for_cli(args: argparse.Namespace, device: str = "cpu"):
    """(model, tokenizer) for `--checkpoint` (a run folder, final/, best/ or checkpoints/step_*, as
    `gptmini eval` takes) or `--model` (a registry URI)."""
    from gptmini.checkpoint import load_model
    from gptmini.weights import load_pretrained

    if args.checkpoint:
        return load_model(args.checkpoint, device=device)
    try:
        from gptmini.registry import resolve_model_uri
    except ImportError as exc:
        raise ValueError(
            f"--model {args.model} needs the model registry (gptmini.registry with MLflow: "
            f"pip install 'gptmini[pipeline]'), which is unavailable here ({exc}); use --checkpoint DIR instead"
        ) from exc
    return load_pretrained(resolve_model_uri(args.model), device=device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gptmini generate", description="Stream text from a trained gptmini model.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a run folder, final/, checkpoints/best/ or a checkpoints/step_* folder")
    src.add_argument("--model", help="registry URI, e.g. models:/gptmini@production")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: empty prompt)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
        model, tok = load_for_cli(args, device=args.device)
        prompts = [[tok.eot_token] + tok.encode(text) for text in (args.prompt or [""])]
        generator = None
        if args.seed is not None:
            generator = torch.Generator(device=args.device).manual_seed(args.seed)
        tokens = stream(
            model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, eos_token_id=tok.eot_token, use_cache=not args.no_cache, generator=generator,
            allowed=sampling_mask(tok, model.config.vocab_size, torch.device(args.device)),
        )
        if len(prompts) == 1:
            print_stream(tok, args.prompt[0] if args.prompt else "", tokens)
        else:
            print_batch(tok, args.prompt, tokens)
    except (ValueError, FileNotFoundError) as exc:
        print(f"gptmini generate: {exc}", file=sys.stderr)
        return 2
    return 0


def print_stream(tok, prompt: str, tokens: Iterator[Tensor]) -> None:
    # A character can span several tokens: decode bytes incrementally so nothing prints half a character.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(prompt)
    for column in tokens:
        t = int(column[0])
        if t == tok.eot_token:
            break
        sys.stdout.write(utf8.decode(tok.decode_bytes([t])))
        sys.stdout.flush()
    sys.stdout.write(utf8.decode(b"", final=True) + "\n")


def print_batch(tok, prompts: list[str], tokens: Iterator[Tensor]) -> None:
    rows = torch.stack(list(tokens), dim=1).tolist()  # (B, new)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        if tok.eot_token in row:
            row = row[: row.index(tok.eot_token)]
        print(f"--- [{i}]\n{prompt}{tok.decode(row)}")


if __name__ == "__main__":
    sys.exit(main())
