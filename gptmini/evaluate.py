"""Validation loss and perplexity: `evaluate()` for the training loop, `gptmini eval` for a checkpoint."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from gptmini import parallel


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, max_batches: int, autocast: contextlib.AbstractContextManager
             | None = None) -> dict[str, float]:
    """Token-weighted mean loss over at most `max_batches` batches per rank, summed over the ranks.

    Every rank must run the same number of batches (FSDP gathers weights inside forward); the val loader
    guarantees the same count per rank.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
    for i, (x, y) in enumerate(batches):
        if i >= max_batches:
            break
        with autocast or contextlib.nullcontext():
            _, loss = model(x, y)
        n = (y != -1).sum()
        totals[0] += loss.double() * n
        totals[1] += n
    parallel.all_reduce(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1]).item()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)), "val_tokens": int(totals[1].item())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gptmini eval", description="Val loss and perplexity of a checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder, final/ or checkpoints/best/ (weights), or a checkpoints/step_* folder")
    p.add_argument("--data-dir", help="a `gptmini prepare` folder (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--seq-len", type=int, help="default: the run's seq_len, else the model's max_seq_len")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=10**9, help="stop after this many batches")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", dest="json_out", help="also write the result to this JSON file")
    args = p.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--max-batches", args.max_batches)):
        if value < 1:
            p.error(f"{flag} {value} must be >= 1")

    from gptmini.checkpoint import load_model, write_json
    from gptmini.data.loader import SlidingWindowDataset, TokenShards, WindowLoader, DistributedWindowSampler
    from gptmini.data.sources import DataError

    try:
        device = parallel.pick_device(args.device, 0)
        model, _ = load_model(args.checkpoint, device=device)
        run_cfg = _run_config(Path(args.checkpoint))
        data_dir = args.data_dir or (run_cfg or {}).get("data", {}).get("data_dir")
        if not data_dir:
            raise ValueError(f"no --data-dir given and none recorded with {args.checkpoint!r}; pass --data-dir DIR")
        seq_len = args.seq_len or (run_cfg or {}).get("data", {}).get("seq_len") or model.config.max_seq_len
        tokens = TokenShards.open(data_dir, args.split)
        dataset = SlidingWindowDataset(tokens, seq_len, seq_len)
        if len(tokens) < seq_len + 1:
            raise DataError(f"the {args.split} split of {data_dir} has {len(tokens)} tokens, fewer than one window "
                            f"of seq_len={seq_len} (+1); pass a smaller --seq-len")
        loader = WindowLoader(dataset, DistributedWindowSampler(len(dataset), shuffle=False), args.batch_size, device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"gptmini eval: error: {exc}", file=sys.stderr)
        return 2
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    result = evaluate(model, loader, args.max_batches, autocast)
    result.update(checkpoint=str(args.checkpoint), data_dir=str(data_dir), split=args.split, seq_len=seq_len)
    print(json.dumps(result, indent=2))
    if args.json_out:
        write_json(Path(args.json_out), result)
    return 0


def _run_config(path: Path) -> dict | None:
    """The training config saved with the checkpoint (or its run), to find the data and seq_len it used."""
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "train_config.json").is_file():
            return json.loads((folder / "train_config.json").read_text())
        if (folder / "config.toml").is_file() and (folder / "metrics.jsonl").exists():
            from gptmini.config import read_toml

            return read_toml(folder / "config.toml")
    return None
