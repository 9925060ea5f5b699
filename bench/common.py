"""What the benchmarks share: the machine and versions a figure was measured on, timing, profiling, the trainer's
own training step, comma-list flags and the markdown table each prints. bench/ is on sys.path as a bench runs."""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptmini import trainer
from gptmini.config import Config
from gptmini.device import matmul_dtype
from gptmini.files import git_commit
from gptmini.loss import LossFn, next_token
from gptmini.model import GPTOSSMini
from gptmini.optim import build_optimizer
from gptmini.parallel import DistEnv, compile_model

ROOT = Path(__file__).resolve().parents[1]


def environment(on: torch.device | None = None, **extra: Any) -> dict[str, Any]:
    """When, on what and by which code a figure was measured: the git commit, and a digest of gptmini/ and bench/
    for a copy without git (the GPU machine's); a CUDA device `on` adds the GPU's name, memory and versions."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("gptmini/**/*.py"), *ROOT.glob("bench/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    meta = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "git_commit": git_commit(ROOT),
        "source_sha256": digest.hexdigest(),
    }
    if on is not None and on.type == "cuda":
        props = torch.cuda.get_device_properties(on)
        meta |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30, "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version(), "sm_count": props.multi_processor_count,
                 "capability": f"{props.major}.{props.minor}"}
    return meta | extra


def fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def md_table(header: list[str], rows: list[list[Any]], align: str = "") -> str:
    """A markdown table; `align` has an l or r per column (default: the first left, the figures right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in [header, rule, *rows])


class Timer:
    """Wall time of a region. On CUDA: synchronize first (earlier work is done), then CUDA events around the
    region and one synchronize at its end; no host sync inside it."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        if self.cuda:
            torch.cuda.synchronize()
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            return
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def seconds(fn: Callable[[], object], device: torch.device | str = "cpu", repeats: int = 3) -> list[float]:
    """The wall time of each of `repeats` calls of fn (a warm-up is the caller's)."""
    times = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        times.append(t.seconds)
    return times


def profile(fn: Callable[[], object], steps: int = 1, device: torch.device | str = "cpu") -> Any:
    """torch.profiler over `steps` calls of fn (the CPU, and the GPU's kernels on CUDA)."""
    from torch.profiler import ProfilerActivity

    cuda = torch.device(device).type == "cuda"
    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda,
                                record_shapes=True) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return prof


def ints(text: str) -> list[int]:
    """argparse type of a comma list of positive integers (`--batch 1,16`)."""
    values = [int(v) for v in text.split(",")]
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer, e.g. 1,16")
    return values


def names(*allowed: str) -> Callable[[str], list[str]]:
    """argparse type of a comma list drawn from `allowed` (`--sections train,decode`)."""
    def parse(text: str) -> list[str]:
        if unknown := set(values := text.split(",")) - set(allowed):
            raise argparse.ArgumentTypeError(f"unknown {','.join(sorted(unknown))}; choose from {','.join(allowed)}")
        return values
    return parse


class FixedBatch:
    """A loader that hands the trainer's step whatever batch was set last: what is timed is the work."""

    batch: tuple[torch.Tensor, torch.Tensor]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


def train_step(model: nn.Module, device: torch.device, compile: str = "off", grad_accum: int = 1,
               precision: str = "auto", cfg: Config | None = None,
               loss_fn: LossFn = next_token) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`step(x, y)`: `gptmini.trainer.train_step` itself (grad_accum micro-batches under the trainer's
    autocast, clipping, the AdamW of `cfg.optim`, default `OptimConfig`'s) on `model`, compiled as `compile`
    says, scored by `loss_fn`. It returns the loss tensor unread, so nothing waits on the device."""
    cfg = copy.deepcopy(cfg) if cfg is not None else Config()
    cfg.train.grad_accum, cfg.train.precision = grad_accum, precision
    if isinstance(model, GPTOSSMini):  # the trainer's expert kernel for autocast's dtype, set before compiling
        model.set_expert_kernel(compute_dtype=matmul_dtype(device, precision))
    if compile == "model":  # the whole forward and the loss in one graph: compile the loss, which runs forward
        loss_fn = torch.compile(loss_fn)
    compiled = compile_model(model, "off" if compile == "model" else compile)
    loader = FixedBatch()
    run = trainer.Run(cfg, DistEnv(0, 0, 1, device), Path("."), model, compiled,
                      build_optimizer(compiled, cfg.optim), loader, None, None, trainer.TrainState(), time.time(),
                      None, None, precision)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loader.batch = (x, y)
        return trainer.train_step(run, cfg.optim.lr, loss_fn)[0]

    return step
