"""A model on disk, and the one loader: `load_model` reads a run folder, a weights folder or a training
checkpoint (`gptmini.checkpoint`). A weights folder is `model.safetensors` + `config.json` (the ModelConfig,
tokenizer included), and for a trained tokenizer its `tokenizer.tiktoken`, so the folder decodes on a machine
that never saw the data.

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

from gptmini import parallel
from gptmini.checkpoint import MARKER, STEP_PREFIX, CheckpointError, is_complete, latest_checkpoint, load_checkpoint
from gptmini.errors import MissingPathError, UserError
from gptmini.files import read_json, write_dir_atomic, write_json
from gptmini.model import GPTOSSMini, ModelConfig, rope_inv_freq
from gptmini.parallel import unwrap
from gptmini.tokenizer import BPE_FILE, Tokenizer, check_vocab, get_tokenizer, trained_tokenizer_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


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


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               model_class: type[GPTOSSMini] = GPTOSSMini) -> tuple[GPTOSSMini, Tokenizer]:
    """(model in eval mode, tokenizer) from a run folder, a weights folder (final/, checkpoints/best/, a
    downloaded registry version) or a training checkpoint folder: the one loader every caller uses.
    `model_class` is what is built (`gptmini.GPTOSSMini`, the public API's, for `from_pretrained`).

    A run folder resolves to final/, else checkpoints/best/, else its latest complete checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"checkpoint path {str(path)!r} does not exist; pass a run, final/ or checkpoint folder")
    if (path / "checkpoints").is_dir() or (path / "final").is_dir():
        for candidate in (path / "final", path / "checkpoints" / "best"):
            if (candidate / WEIGHTS_NAME).is_file():
                return load_pretrained(candidate, device, model_class)
        latest = latest_checkpoint(path)
        if latest is None:
            raise MissingPathError(f"run folder {str(path)!r} holds no final/, best/ or complete checkpoint")
        path = latest
    if (path / WEIGHTS_NAME).is_file():
        return load_pretrained(path, device, model_class)
    if not is_complete(path):
        raise CheckpointError(
            f"{str(path)!r} is neither a weights folder (model.safetensors + config.json) nor a complete "
            f"training checkpoint ({MARKER} marker); pass a run folder, final/, best/ or checkpoints/{STEP_PREFIX}*"
        )
    model_config = ModelConfig.from_dict(read_json(path / "train_config.json")["model"])
    model = model_class(model_config)
    load_checkpoint(path, model, None, parallel.DistEnv(0, 0, 1, torch.device("cpu")))
    return model.to(device).eval(), get_tokenizer(model_config.tokenizer, search=path)
