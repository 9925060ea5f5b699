"""Checkpoints that resume exactly, written atomically, read without unpickling arbitrary objects.

A training checkpoint `RUN/checkpoints/step_XXXXXXXX/` holds:

    dcp/                      model + optimizer tensors (torch.distributed.checkpoint: sharded under FSDP,
                              resharded on load, so a checkpoint loads at another world size)
    trainer_state.json        step, tokens seen, best val loss, the data sampler's (global) position
    rank_00000.json ...       per rank: the python/numpy/torch/CUDA RNG states
    train_config.json         the resolved config (exact; config.toml is the readable copy)
    tokenizer.tiktoken        a trained tokenizer's file (none for a published encoding), so it decodes anywhere
    COMPLETE                  the commit marker, written last

Every rank writes into `.tmp_step_XXXXXXXX/`; after a barrier rank 0 writes COMPLETE, fsyncs and renames
the folder into place. A checkpoint killed mid-write is therefore a `.tmp_*` folder (or a folder without
COMPLETE) and is never picked by `--resume auto`.

Safety: tensors load through torch.load(weights_only=True) (DCP's reader) or safetensors, state through
JSON, and DCP's pickled `.metadata` through an allowlist unpickler (`SafeFileSystemReader`). We never put
non-tensor objects in the DCP payload, because DCP would unpickle those freely.
"""
from __future__ import annotations

import base64
import contextlib
import io
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from gptmini import parallel
from gptmini.errors import UserError
from gptmini.files import fsync_dir, fsync_tree, read_json, write_atomic, write_json
from gptmini.tokenizer import BPE_FILE, trained_tokenizer_file

STEP_PREFIX = "step_"
MARKER = "COMPLETE"


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted or read; the message names the file."""


# RNG states as JSON

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# DCP metadata without arbitrary unpickling

# `.metadata` is a pickle of these dataclasses; anything else in it is refused. BytesStorageMetadata is
# left out on purpose: DCP reads an entry so marked with torch.load(weights_only=False), so a tampered
# `.metadata` could turn any key into a pickle that runs code (tests/test_security.py), and our payload
# is tensors only (`_only_tensors`).
_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps "torch.strided" to the layout, nothing else
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "WindowsPath"),
}
_SAFE_TORCH_ENUMS = {"layout", "memory_format", "dtype"}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and type(getattr(torch, name, None)).__name__ in _SAFE_TORCH_ENUMS:
            return getattr(torch, name)  # torch.float32, torch.strided, torch.contiguous_format
        raise CheckpointError(
            f"checkpoint metadata references {module}.{name}, which a DCP checkpoint never holds; "
            f"refusing to load it (the file may be tampered with)"
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp.Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with open(path, "rb") as f:
            metadata = _SafeUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, dcp.Metadata):
            raise CheckpointError(f"{path} does not hold DCP Metadata; the checkpoint is damaged")
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _only_tensors(tree: Any, where: str = "") -> None:
    """DCP stores non-tensors as pickles; we keep those in JSON instead."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _only_tensors(v, f"{where}.{k}")
    elif not isinstance(tree, torch.Tensor):
        raise TypeError(f"checkpoint payload {where} is a {type(tree).__name__}, not a tensor")


# Training checkpoints

@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; a single process is a case we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file() and (Path(path) / "trainer_state.json").is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; `.tmp_*` and unmarked folders are half-written and skipped."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not is_complete(path):
        raise CheckpointError(
            f"--resume {resume!r} is not a complete checkpoint folder (no {MARKER} marker); "
            f"pass a checkpoints/{STEP_PREFIX}XXXXXXXX folder, or --resume auto"
        )
    return path


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    config_json: str,
    config_toml: str,
    env: parallel.DistEnv,
    keep_last: int,
    tokenizer_file: str | os.PathLike | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the committed folder. `tokenizer_file`: see save_pretrained."""
    # Every rank looks, so a missing tokenizer fails them all here rather than leaving the others at a barrier.
    bpe = trained_tokenizer_file(parallel.unwrap(model).config.tokenizer, tokenizer_file)
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed mid-write
        tmp.mkdir(parents=True)
    parallel.barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    payload = {"model": model_sd, "optim": optim_sd["state"]}
    _only_tensors(payload)
    with _quiet_single_process():
        dcp.save(payload, storage_writer=dcp.FileSystemWriter(tmp / "dcp", sync_files=True), no_dist=not env.distributed)
    write_json(tmp / f"rank_{env.rank:05d}.json", rank_state)
    if env.is_main:
        write_json(tmp / "trainer_state.json", dict(trainer_state, world_size=env.world_size))
        write_atomic(tmp / "train_config.json", config_json)
        write_atomic(tmp / "config.toml", config_toml)
        if bpe is not None:
            shutil.copyfile(bpe, tmp / BPE_FILE)  # made durable by the fsync_tree below
    parallel.barrier()
    if env.is_main:
        fsync_tree(tmp)
        write_json(tmp / MARKER, {"step": step, "world_size": env.world_size})
        if final.exists():  # a re-run of the same step (resume from an older checkpoint)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    parallel.barrier()
    return final


def _dcp_load(state: dict[str, Any], path: Path, env: parallel.DistEnv) -> None:
    """dcp.load, with a damaged data file as one CheckpointError (DCP raises a BaseException per rank)."""
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=SafeFileSystemReader(path / "dcp"), no_dist=not env.distributed)
    except CheckpointException as exc:
        first = next(iter(exc.failures.values()), exc)
        first = first[0] if isinstance(first, tuple) else first  # (exception, traceback) per rank
        why = str(first).replace("\x1b[1m", "").replace("\x1b[0m", "").split(". ")[0][:160]
        raise CheckpointError(
            f"{path} is damaged ({type(first).__name__}: {why}); delete it to "
            f"resume from the checkpoint before it"
        ) from None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, env: parallel.DistEnv
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load model (+ optimizer) tensors in place, resharding as needed.

    Returns (trainer_state, this rank's state). The rank state (sampler position, RNG) is None when the
    checkpoint was written at another world size: the weights carry over, the exact data order cannot.
    """
    path = Path(path)
    trainer_state = read_json(path / "trainer_state.json")
    # Vet the metadata up front: DCP would bury our refusal inside a CheckpointException per rank.
    SafeFileSystemReader(path / "dcp").read_metadata()
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        _dcp_load({"model": model_sd}, path, env)
        set_model_state_dict(model, model_sd)
        return trainer_state, None
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _dcp_load({"model": model_sd, "optim": optim_sd["state"]}, path, env)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    rank_file = path / f"rank_{env.rank:05d}.json"
    same_world = trainer_state["world_size"] == env.world_size and rank_file.is_file()
    return trainer_state, read_json(rank_file) if same_world else None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective under FSDP: the unsharded weights on CPU (complete on rank 0)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def __getattr__(name: str):
    # `gptmini.checkpoint.load_model` is how the docs named the model loader before it moved to `gptmini.weights`
    # (a layer above this one, so imported only when asked for): code written against it keeps working.
    if name == "load_model":
        from gptmini.weights import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
