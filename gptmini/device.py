"""Where a model runs: the device, its autocast, and its peak FLOP/s for MFU.

The trainer, evaluation, generation and the benchmarks all choose and describe the device here.
"""
from __future__ import annotations

import contextlib

import torch

from gptmini.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) for MFU; other devices get no MFU rather than a guess.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
              "4090": 165e12}


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when a GPU is visible, else CPU; a rank takes the GPU of its local rank."""
    if name not in DEVICES:
        raise UserError(f"device {name!r} is unknown; choose one of: {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' was asked for but no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """What matmuls compute in; weights, optimizer state and the loss stay fp32 either way. `auto`: bf16
    autocast on CUDA, fp32 on CPU. `bf16` or `fp32` force it on either device (the trainer asks `native_bf16`
    first: on a CPU bf16 pays only with bf16 units; BENCHMARKS.md, "Training throughput")."""
    if matmul_dtype(device, precision) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def matmul_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype `autocast(device, precision)` runs matmuls in, for fp32 weights."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware: CUDA, or an x86 CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
