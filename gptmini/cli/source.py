"""`--checkpoint PATH` or `--model models:/...`: the model a command runs, named either way."""
from __future__ import annotations

import argparse

import torch

from gptmini.weights import load_model
from gptmini.model import GPTOSSMini
from gptmini.registry import resolve_model_uri
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
