"""`--checkpoint PATH` or `--model models:/...`: the model a command runs, named either way."""
from __future__ import annotations

import argparse

import torch

from gptmini.weights import load_model
from gptmini.model import GPTOSSMini
from gptmini.errors import UserError
from gptmini.rag import MAX_STRIDE, RagOptions
from gptmini.registry import resolve_index, resolve_model_uri
from gptmini.retrieval import MAX_K, Index
from gptmini.tokenizer import Tokenizer


def add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a run folder, final/, checkpoints/best/ or a checkpoints/step_* folder")
    src.add_argument("--model", help="registry URI, e.g. models:/gptmini@production or models:/gptmini/3")


def load_model_source(args: argparse.Namespace, device: str | torch.device = "cpu") -> tuple[GPTOSSMini, Tokenizer]:
    """The model `--checkpoint PATH` or `--model models:/...` names: a registry version is downloaded once
    into the local cache, then loaded like any weights folder."""
    path = args.checkpoint or resolve_model_uri(args.model)
    return load_model(path, device=device)


def add_retrieval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retrieval (docs/rag.md)")
    g.add_argument("--rag", action="store_true", help="read the best passages of the training text before the "
                   "prompt (In-Context RALM)")
    g.add_argument("--index", help="a prepared folder with an index, or an index file (default: a registry "
                   "version's own index, or the index of the data a run trained on)")
    g.add_argument("--rag-k", type=int, default=1, help=f"passages per retrieval, 1 to {MAX_K}")
    g.add_argument("--rag-stride", type=int, default=None, help=f"retrieve again every N new tokens, 1 to "
                   f"{MAX_STRIDE} (default: once)")


def retrieval_options(args: argparse.Namespace) -> RagOptions:
    return RagOptions(k=args.rag_k, stride=args.rag_stride)


def load_index(args: argparse.Namespace, data_dir: str | None = None) -> Index:
    """The index `--index` names; else the registry version's (`--model`); else that of `data_dir`."""
    if args.index:
        return Index.open(args.index)
    if args.model:
        found = resolve_index(args.model)
        if found is None:
            raise UserError(f"{args.model} carries no retrieval index; pass --index DATA_DIR (a folder with "
                            f"`gptmini index DATA_DIR` run on it), or leave out --rag")
        return Index(found)
    if data_dir:
        return Index.of(data_dir)
    raise UserError("--rag needs an index: pass --index DATA_DIR (a folder indexed by `gptmini index DATA_DIR`)")
