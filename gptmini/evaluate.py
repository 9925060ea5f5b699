"""Validation loss and perplexity: the one evaluation, used by the trainer, `gptmini eval` and the gate.

Token-weighted: the mean loss over every target token, not over batches, so a short last batch counts for
what it holds. Losses are summed on the device and read once at the end (no host sync per batch), under the
same autocast as training.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from gptmini import parallel
from gptmini.checkpoint import load_model
from gptmini.data.loader import eval_loader
from gptmini.device import autocast


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> dict[str, float | int]:
    """`val_loss` (nats/token), `val_perplexity` and `val_tokens` over at most `max_batches` batches per rank,
    summed over the ranks. Every rank must run the same number of batches (FSDP gathers weights inside
    forward); `eval_loader` gives each rank the same count."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(device):
            _, loss = model(x, y)
        n = (y != -1).sum()
        totals[0] += loss.double() * n
        totals[1] += n
    parallel.all_reduce(totals)
    model.train(was_training)
    tokens = int(totals[1].item())
    if tokens == 0:
        raise ValueError("evaluate() got no batches; give it a loader with at least one window")
    loss = (totals[0] / totals[1]).item()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)), "val_tokens": tokens}


def evaluate_split(model: nn.Module, data_dir: str | Path, seq_len: int | None = None, batch_size: int = 8,
                   split: str = "val", max_batches: int | None = None) -> dict[str, float | int]:
    """`evaluate` over a prepared folder's split, in order, in non-overlapping windows of `seq_len` (default:
    the model's max_seq_len). The gate calls it for two models with the same data and seq_len, so they are
    compared on the same tokens."""
    device = next(model.parameters()).device
    seq_len = seq_len or model.config.max_seq_len
    loader = eval_loader(data_dir, split, seq_len, batch_size, device=device)
    return evaluate(model, loader, max_batches)


def evaluate_weights(path: str | Path, data_dir: str | Path, seq_len: int | None = None,
                     batch_size: int = 8) -> dict[str, float | int]:
    """`evaluate_split` of the model saved at `path` (a run, weights or checkpoint folder)."""
    model, _ = load_model(path)
    return evaluate_split(model, data_dir, seq_len, batch_size)
