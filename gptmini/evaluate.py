"""Validation: the one evaluation, used by the trainer, `gptmini eval`, the flow and the gate.

Windows come from `PieceWindows`: each val piece read on its own, so no window reads across a cut. Two
measures over the same targets:
- `val_loss`, nats per token: the mean over every target token, not over batches, so a short last batch
  counts for what it holds;
- `val_bpb`, bits per byte: the nats summed over the targets / ln 2 / the UTF-8 bytes those targets spell.
  It does not depend on the tokenizer, so models with different tokenizers compare, on the same text.
Sums stay on the device and are read once at the end (no host sync per batch), under training's autocast.

A model whose tokenizer is not the data's reads the same val text, decoded and encoded again with its own
tokenizer: same pieces, same bytes, its own tokens.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gptmini import parallel
from gptmini.weights import load_model
from gptmini.data.loader import PieceWindows, TokenShards, piece_bounds
from gptmini.data.prepare import new_ranges, read_manifest
from gptmini.data.sources import DataError
from gptmini.device import autocast
from gptmini.loss import token_losses
from gptmini.tokenizer import Tokenizer, get_tokenizer

LN2 = math.log(2)


@functools.lru_cache(maxsize=8)
def _byte_lengths(tokenizer: Tokenizer, size: int) -> np.ndarray:
    lengths = np.zeros(size, dtype=np.int64)
    for i in range(tokenizer.n_ordinary):
        try:
            lengths[i] = len(tokenizer.enc.decode_single_token_bytes(i))
        except KeyError:  # a gap in the ids (cl100k has some)
            pass
    return lengths


def token_bytes(tokenizer: Tokenizer, size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(size,) int64: the UTF-8 bytes each id stands for; 0 for special and unused ids."""
    return torch.from_numpy(_byte_lengths(tokenizer, size)).to(device)


def token_nats(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, T) nats of each target y given the tokens x up to it (0 where y == -1): what every measure sums.
    A served model's log-probabilities (`gptmini serve`'s logprobs) are their negatives."""
    with autocast(x.device), parallel.loss_context(model):
        losses = token_losses(parallel.unwrap(model), x, y)  # (B, T), 0 where y == -1
    return parallel.full(losses)  # a DTensor under tensor parallelism


def window_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, nbytes: torch.Tensor) -> torch.Tensor:
    """(B, 3) float64 per window: nats over its targets, UTF-8 bytes of its targets, targets."""
    losses = token_nats(model, x, y)
    valid = y != -1
    return torch.stack([losses.double().sum(1), (nbytes[y.clamp(min=0)] * valid).sum(1).double(),
                        valid.sum(1).double()], dim=1)


def measures(nats: float, nbytes: float, tokens: float) -> dict[str, float | int]:
    loss = nats / tokens
    return {"val_loss": loss, "val_bpb": nats / LN2 / nbytes, "val_perplexity": math.exp(min(loss, 700.0)),
            "val_tokens": int(tokens), "val_bytes": int(nbytes)}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, nbytes: torch.Tensor, max_batches: int | None = None,
             env: parallel.DistEnv | None = None) -> dict[str, float | int]:
    """`val_loss` (nats/token), `val_bpb` (bits/byte), `val_perplexity`, `val_tokens` and `val_bytes` over at
    most `max_batches` batches per rank, summed over the ranks. `nbytes` is `token_bytes` of the model's
    tokenizer; `env`, the training mesh, sums over its data ranks only. Every rank must run the same number of batches (FSDP gathers weights inside forward);
    `data.loader.piece_loader` gives each rank the same count."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, bytes, tokens
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        totals += window_sums(model, x, y, nbytes).sum(0)
    parallel.all_reduce(totals, env=env)
    model.train(was_training)
    nats, total_bytes, tokens = totals.tolist()
    if tokens == 0:
        raise ValueError("evaluate() got no batches; give it a loader with at least one window")
    return measures(nats, total_bytes, tokens)


def split_stream(data_dir: str | Path, tokenizer: Tokenizer, split: str = "val") -> tuple[TokenShards | np.ndarray, int]:
    """A split as `tokenizer`'s tokens and its end-of-text id: the shards themselves when they were written
    with it, else each piece's text encoded again, in the same order."""
    manifest = read_manifest(data_dir)
    shards = TokenShards.open(data_dir, split)
    if manifest["tokenizer"] == tokenizer.name:
        return shards, tokenizer.eot_token
    theirs = get_tokenizer(manifest["tokenizer"], data_dir)
    parts = []
    for b, e in zip(*(a.tolist() for a in piece_bounds(shards, manifest["eot_token"]))):
        # Pieces are cut between characters, so each decodes on its own.
        text = theirs.decode_bytes(shards[b:e].tolist()).decode("utf-8", errors="replace")
        parts += [np.asarray(tokenizer.encode(text), dtype=np.uint32), np.array([tokenizer.eot_token], np.uint32)]
    return (np.concatenate(parts) if parts else np.empty(0, np.uint32)), tokenizer.eot_token


@torch.no_grad()
def piece_sums(model: nn.Module, tokenizer: Tokenizer, data_dir: str | Path, seq_len: int | None = None,
               batch_size: int = 8, split: str = "val",
               max_batches: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nats, bytes, tokens) of each piece of a split (all of them unless `max_batches` stops early): what the
    gate pairs two models on."""
    device = next(model.parameters()).device
    stream, eot = split_stream(data_dir, tokenizer, split)
    windows = PieceWindows(stream, seq_len or model.config.max_seq_len, eot)
    if not windows.n_pieces:
        raise DataError(f"the {split} split of {data_dir} is empty; re-run `gptmini prepare ... --force` with a "
                        f"--val-fraction above 0")
    nbytes = token_bytes(tokenizer, model.config.vocab_size, device)
    sums = np.zeros((windows.n_pieces, 3))
    model.eval()
    stop = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
    for k in range(0, stop, batch_size):
        idx = np.arange(k, min(k + batch_size, stop))
        x, y = windows.batch(idx)
        np.add.at(sums, windows.piece[idx], window_sums(model, x.to(device), y.to(device), nbytes).cpu().numpy())
    return sums[:, 0], sums[:, 1], sums[:, 2]


def new_pieces(data_dir: str | Path) -> np.ndarray | None:
    """True for each val piece (in `piece_sums`' order) of a document new since the manifest's `since` dataset;
    None when the manifest names no earlier dataset."""
    manifest = read_manifest(data_dir)
    if "since" not in manifest:
        return None
    begins, _ = piece_bounds(TokenShards.open(data_dir, "val", verify=False), manifest["eot_token"])
    mask = np.zeros(len(begins), dtype=bool)
    for a, b in new_ranges(manifest, "val"):
        mask |= (begins >= a) & (begins < b)
    return mask


def bpb_new_and_old(nats: np.ndarray, nbytes: np.ndarray, new: np.ndarray) -> dict[str, float | None]:
    """Bits per byte over the new documents' val pieces ("did it learn the new text") and over the others ("did
    it forget")."""
    def bpb(m: np.ndarray) -> float | None:
        return float(nats[m].sum() / LN2 / nbytes[m].sum()) if m.any() else None

    return {"val_bpb_new": bpb(new), "val_bpb_old": bpb(~new)}


def evaluate_split(model: nn.Module, tokenizer: Tokenizer, data_dir: str | Path, seq_len: int | None = None,
                   batch_size: int = 8, split: str = "val", max_batches: int | None = None) -> dict[str, float | int]:
    """`evaluate` over every window of a prepared folder's split (default seq_len: the model's max_seq_len),
    in the model's own tokens."""
    nats, nbytes, tokens = piece_sums(model, tokenizer, data_dir, seq_len, batch_size, split, max_batches)
    return measures(nats.sum(), nbytes.sum(), tokens.sum())


def evaluate_weights(path: str | Path, data_dir: str | Path, seq_len: int | None = None,
                     batch_size: int = 8) -> dict[str, float | int]:
    """`evaluate_split` of the model saved at `path` (a run, weights or checkpoint folder)."""
    model, tokenizer = load_model(path)
    return evaluate_split(model, tokenizer, data_dir, seq_len, batch_size)

