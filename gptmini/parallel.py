"""Process groups and model wrapping: none, DDP, or FSDP2.

The model never imports torch.distributed; this file wraps an already-built model (as gpt-fast and
torchtitan do). torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) decides whether we are
distributed, so `gptmini train` and `torchrun -m gptmini.train` run the same code; multi-node is
torchrun's rendezvous and nothing of ours.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gptmini.device import pick_device
from gptmini.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device_name: str, parallel: str) -> DistEnv:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU), or run as a single process.

    `--parallel ddp|fsdp` without torchrun gets a one-rank group, so the wrapping code runs the same.
    """
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name, local_rank)
    if world > 1 and parallel == "none":
        raise UserError(
            f"--parallel none with WORLD_SIZE={world}: each rank would train its own copy; use --parallel ddp or fsdp"
        )
    if under_torchrun or parallel != "none":
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)  # generous: rank 0 writes plots/checkpoints alone
        if under_torchrun:
            # torchrun keeps one store across its --max-restarts rounds: a restarted group read the gloo
            # addresses the previous round left there and dialled a dead rank's port (or waited for ever).
            # A prefix per round keeps each round's keys apart.
            store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"round_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(rank, local_rank, world, device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: FSDP's units, and what torch.compile compiles one by one."""
    blocks = [m for m in model.modules() if type(m).__name__ == "Block"]
    if not blocks:
        raise UserError(f"{type(model).__name__} has no `Block` modules to shard; FSDP needs per-block units")
    return blocks


def compile_model(model: nn.Module, how: str = "blocks", mode: str = "default", backend: str = "inductor") -> nn.Module:
    """torch.compile before wrapping (torchtitan's order). `blocks` compiles each block on its own (regional
    compilation: identical blocks share one graph, so compile time stops growing with depth, and FSDP's hooks
    stay outside the graphs); `model` compiles the whole model, head and loss included; `off` does nothing."""
    kwargs = {"backend": backend} | ({} if mode == "default" else {"mode": mode})
    if how == "model":
        return torch.compile(model, **kwargs)
    if how == "blocks":
        for block in transformer_blocks(model):
            block.compile(**kwargs)
    return model


def wrap(model: nn.Module, parallel: str, env: DistEnv) -> nn.Module:
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute with fp32 gradient reduction on GPU; CPU/gloo keeps fp32 throughout.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if env.device.type == "cuda" else MixedPrecisionPolicy())
        for block in transformer_blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on non-final micro-steps: accumulation then costs one reduce per step."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
