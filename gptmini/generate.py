"""Generation as a library call: `stream`, `generate` and `generate_text` run the caller's prompts through the
engine's one decode loop (`gptmini.engine.Batch`) to their end, with its KV cache; `use_cache=False`
recomputes each whole sequence every step instead, which is the reference the cache is tested against.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence as Seq

import torch
from torch import Tensor

from gptmini.engine import Batch, Sampling, Sequence, check_sampling, prompt_ids, sample_next, sampling_mask
from gptmini.errors import UserError
from gptmini.model import GPTOSSMini

__all__ = ["check_sampling", "generate", "generate_text", "sample_next", "sampling_mask", "stream"]

Prompts = Tensor | Seq[Seq[int]]


def as_lists(prompts: Prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise UserError(f"input_ids must be (batch, seq_len), got shape {tuple(prompts.shape)}")
        return prompts.tolist()
    out = [list(p) for p in prompts]
    if not out or min(map(len, out)) == 0:
        raise UserError("every prompt needs at least one token (start an empty prompt with end-of-text)")
    return out


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
    prompts = as_lists(idx)
    T = max(map(len, prompts))
    total = T + max_new_tokens
    if total > cfg.max_seq_len and cfg.rope_scaling is None and cfg.sliding_window is None:
        raise UserError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds max_seq_len={cfg.max_seq_len}; "
            f"shorten them, or set rope_scaling='ntk' or a sliding_window in the model config"
        )
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, ignore_eos=eos_token_id is None)
    seqs = [Sequence(p, sampling, generator=generator) for p in prompts]
    batch = Batch(model, len(seqs), eot=eos_token_id, allowed=allowed, max_len=total, use_cache=use_cache)
    waiting = deque(seqs)
    fill = eos_token_id if eos_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        for i in range(max_new_tokens):
            if any(len(s.tokens) <= i for s in seqs if not s.finish_reason):
                batch.step(lambda k: [waiting.popleft() for _ in range(min(k, len(waiting)))], decode=i > 0)
            yield torch.tensor([s.tokens[i] if len(s.tokens) > i else fill for s in seqs], device=batch.device)
            if all(s.finish_reason and len(s.tokens) <= i + 1 for s in seqs):
                return
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


def generate_text(model: GPTOSSMini, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = 1.0, seed: int = 0) -> str:
    """One continuation of `prompt`, as `gptmini generate` samples it: the prompt follows end-of-text (a
    document starts there), temperature 0 is greedy, top_k <= 0 and top_p >= 1 are off."""
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt)
    out = generate(
        model, [ids], int(max_new_tokens), temperature=float(temperature),
        top_k=int(top_k) if top_k and int(top_k) > 0 else None,
        top_p=float(top_p) if top_p is not None and float(top_p) < 1.0 else None,
        eos_token_id=tokenizer.eot_token, generator=torch.Generator(device=device).manual_seed(int(seed)),
        allowed=sampling_mask(tokenizer, model.config.vocab_size, device),
    )[0]
    return tokenizer.decode([t for t in out[len(ids):] if t != tokenizer.eot_token])
