"""A model on disk: `model.safetensors` + `config.json` (the ModelConfig, tokenizer included), and for a
trained tokenizer its `tokenizer.tiktoken`, so the folder decodes on a machine that never saw the data.

safetensors holds raw tensors only, so loading never unpickles anything. Folders are written under a
temporary name and renamed into place, so a reader never sees half a model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptmini.errors import MissingPathError, UserError
from gptmini.files import write_dir_atomic, write_json
from gptmini.model import GPTOSSMini, ModelConfig, rope_inv_freq
from gptmini.tokenizer import BPE_FILE, Tokenizer, check_vocab, get_tokenizer, is_trained

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def unwrap(model: torch.nn.Module) -> GPTOSSMini:
    """The GPTOSSMini inside torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while not isinstance(model, GPTOSSMini):
        model = getattr(model, "_orig_mod", None) or getattr(model, "module")
    return model


def model_state(model: GPTOSSMini) -> dict[str, torch.Tensor]:
    """Each tensor once, contiguous, on CPU: a tied output projection is the embedding and is not stored."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("output.weight")
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_pretrained(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    metadata: dict | None = None,
    tokenizer_file: str | os.PathLike | None = None,
) -> Path:
    """`tokenizer_file`: where a trained tokenizer's file is, if not in the user cache (see `get_tokenizer`)."""
    model = unwrap(model)
    state = model_state(model)
    meta = {"format": "pt", "gptmini": "1", **{k: str(v) for k, v in (metadata or {}).items()}}
    files = {
        WEIGHTS_NAME: lambda p: save_file(state, p, metadata=meta),
        CONFIG_NAME: lambda p: write_json(p, model.config.to_dict()),
    }
    bpe = trained_tokenizer_file(model.config.tokenizer, tokenizer_file)
    if bpe is not None:
        files[BPE_FILE] = lambda p: shutil.copyfile(bpe, p)
    return write_dir_atomic(directory, files)


def trained_tokenizer_file(name: str, search: str | os.PathLike | None = None) -> Path | None:
    """The .tiktoken file a folder holding this model must carry; None for a published encoding."""
    return get_tokenizer(name, search=search).file if is_trained(name) else None


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise MissingPathError(
            f"{path} not found; pass a folder written by gptmini.weights.save_pretrained "
            f"(a run's final/ or checkpoints/best/)"
        )
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_pretrained(
    directory: str | os.PathLike, device: str | torch.device = "cpu", model_class: type[GPTOSSMini] = GPTOSSMini
) -> tuple[GPTOSSMini, Tokenizer]:
    """The model (in eval mode, a `model_class`) and its tokenizer, checked against each other."""
    config = load_config(directory)
    tokenizer = get_tokenizer(config.tokenizer, search=directory)
    check_vocab(config.vocab_size, tokenizer)
    with torch.device("meta"):
        model = model_class(config)
    path = Path(directory) / WEIGHTS_NAME
    try:
        state = load_file(path, device=str(device))
        if config.tie_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        model.load_state_dict(state, strict=True, assign=True)
    except (SafetensorError, KeyError, RuntimeError) as exc:  # a damaged file, or one of another config
        raise UserError(f"{path} does not hold this config.json's weights ({str(exc).splitlines()[0][:200]}); "
                         f"pass a folder written by gptmini.weights.save_pretrained") from None
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    # Built on the meta device to skip a random init that would be overwritten; the one non-persistent
    # buffer is recomputed.
    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta).to(device)
    model.last_aux_loss = torch.zeros((), device=device)
    return model.eval(), tokenizer
