"""`gptmini eval`: val loss, bits per byte and perplexity of a checkpoint or registered model on a prepared split."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptmini.cli import run
from gptmini import rag
from gptmini.cli.source import add_model_source, add_retrieval, load_index, load_model_source, retrieval_options
from gptmini.config import read_toml
from gptmini.device import pick_device
from gptmini.errors import UserError
from gptmini.evaluate import evaluate_split
from gptmini.files import read_json, write_json
from gptmini.retrieval import read_val


def run_config(path: Path) -> dict | None:
    """The training config saved with a checkpoint (or its run): the data and seq_len it trained on."""
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "train_config.json").is_file():
            return read_json(folder / "train_config.json")
        if (folder / "config.toml").is_file() and (folder / "metrics.jsonl").exists():
            return read_toml(folder / "config.toml")
    return None


def evaluate(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    model, tokenizer = load_model_source(args, device=device)
    trained = (run_config(Path(args.checkpoint)) if args.checkpoint else None) or {}
    data_dir = args.data_dir or trained.get("data", {}).get("data_dir")
    if not data_dir:
        raise UserError(f"no --data-dir given and none recorded with {args.checkpoint or args.model!r}; "
                        f"pass --data-dir DIR")
    seq_len = args.seq_len or model.config.max_seq_len
    if args.rag:
        return evaluate_rag(args, model, tokenizer, data_dir, seq_len)
    result = evaluate_split(model, tokenizer, data_dir, seq_len, args.batch_size, args.split, args.max_batches)
    result.update(checkpoint=str(args.checkpoint or args.model), data_dir=str(data_dir), split=args.split,
                  seq_len=seq_len)
    print(json.dumps(result, indent=2))
    if args.json_out:
        write_json(Path(args.json_out), result)


def evaluate_rag(args: argparse.Namespace, model, tokenizer, data_dir: str, seq_len: int) -> None:
    """The four retrieval figures on the val pieces of `data_dir` (docs/rag.md)."""
    opts = retrieval_options(args)
    rag.check_options(opts)
    index = load_index(args, data_dir)
    result = rag.evaluate(model, tokenizer, index, read_val(data_dir), opts, args.rag_eval_stride, seq_len,
                          args.batch_size)
    result.update(checkpoint=str(args.checkpoint or args.model), data_dir=str(data_dir), index=index.sha256)
    print("\n".join(rag.summary_lines(result)))
    print(json.dumps(result, indent=2))
    if args.json_out:
        write_json(Path(args.json_out), result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gptmini eval", description="Val loss (nats/token), bits per byte and "
                                "perplexity of a model, over every window of a prepared split.")
    add_model_source(p)
    p.add_argument("--data-dir", help="a `gptmini prepare` folder (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=("val", "train"))
    p.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len, as training's "
                   "validation and the gate use)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", dest="json_out", help="also write the result to this JSON file")
    add_retrieval(p)
    p.add_argument("--rag-eval-stride", type=int, default=32, help="with --rag: targets scored per retrieval")
    args = p.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--max-batches", args.max_batches)):
        if value is not None and value < 1:
            p.error(f"{flag} {value} must be >= 1")
    return run("gptmini eval", lambda: evaluate(args))
