"""Sampling: greedy, temperature, top-k and top-p, streamed token by token.

The decoding loop runs the prompt once (prefill) and then one token per step against a preallocated KV
cache (`gptmini.model.KVCache`); `use_cache=False` recomputes the whole sequence every step instead, which
is the reference the cache is tested against. Prompts of different lengths are left-padded.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from gptmini.errors import UserError
from gptmini.model import GPTOSSMini, KVCache

Prompts = Tensor | Sequence[Sequence[int]]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} must be >= 1, or None to keep every token")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p} must be in (0, 1], or None to keep every token")


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
            raise UserError(f"input_ids must be (batch, seq_len), got shape {tuple(prompts.shape)}")
        return prompts.to(device), None
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise UserError("every prompt needs at least one token (start an empty prompt with end-of-text)")
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
    # The final norm's weight gives the activations' device and dtype: int8 weights (gptmini.quantize) leave
    # the norms in the model's dtype, while the embedding table may be int8.
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    idx, pad = left_pad(idx, eos_token_id or 0, device)
    B, T = idx.shape
    total = T + max_new_tokens
    if total > cfg.max_seq_len and cfg.rope_scaling is None and cfg.sliding_window is None:
        raise UserError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds max_seq_len={cfg.max_seq_len}; "
            f"shorten them, or set rope_scaling='ntk' or a sliding_window in the model config"
        )
    size = min(total, cfg.sliding_window or total)
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


def generate_text(model: GPTOSSMini, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = 1.0, seed: int = 0) -> str:
    """One continuation of `prompt`, as `gptmini generate` samples it: the prompt follows end-of-text (a
    document starts there), temperature 0 is greedy, top_k <= 0 and top_p >= 1 are off."""
    device = next(model.parameters()).device
    ids = [tokenizer.eot_token] + tokenizer.encode(prompt)
    out = generate(
        model, [ids], int(max_new_tokens), temperature=float(temperature),
        top_k=int(top_k) if top_k and int(top_k) > 0 else None,
        top_p=float(top_p) if top_p is not None and float(top_p) < 1.0 else None,
        eos_token_id=tokenizer.eot_token, generator=torch.Generator(device=device).manual_seed(int(seed)),
        allowed=sampling_mask(tokenizer, model.config.vocab_size, device),
    )[0]
    return tokenizer.decode([t for t in out[len(ids):] if t != tokenizer.eot_token])
