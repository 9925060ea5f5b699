"""The grouped GEMMs of one MoE layer's training step, with the exact shapes and strides the model passes.

torch._grouped_mm picks its kernel from the operands' layouts: the model hands it `w.transpose(1, 2)` (column-
major per expert) in the forward, and autograd hands it transposed activations for the weight gradients. A
ceiling timed on a row-major weight measures another kernel. So the operands here are not described by hand:
`grouped_gemms` runs the model's own MoE forward and backward under FakeTensorMode (no memory, any size, a few
seconds at the seed's 32k tokens) and records every `_grouped_mm` call. bench/kernel_checks.py's ceilings
build their operands from these records; tests/test_moe_kernels.py checks them against
a real run's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from gptmini.model import MoE, ModelConfig

from common import median_seconds


@dataclass(frozen=True)
class GroupedGemm:
    """One distinct `_grouped_mm` of an MoE layer's step; `count` is how many calls per layer share it."""

    role: str  # "w1/w3 fwd", "w2 fwd", "w1/w3 dgrad", "w2 dgrad", "w1/w3 wgrad", "w2 wgrad"
    a_shape: tuple[int, ...]
    a_stride: tuple[int, ...]
    b_shape: tuple[int, ...]
    b_stride: tuple[int, ...]
    out_shape: tuple[int, ...]
    count: int = 1

    @property
    def flops(self) -> int:
        """2 * M * K * N summed over the groups: the rows (or, for a weight gradient, the jagged K) split, the
        total does not."""
        return 2 * self.a_shape[0] * self.a_shape[1] * self.out_shape[-1]

    @property
    def layout(self) -> str:
        return f"{describe(self.a_shape, self.a_stride)} @ {describe(self.b_shape, self.b_stride)}"

    def operands(self, device: torch.device, dtype: torch.dtype, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, b, offs) with these strides, random values (never zeros) and `groups` equal groups."""
        a = torch.empty_strided(self.a_shape, self.a_stride, device=device, dtype=dtype)
        b = torch.empty_strided(self.b_shape, self.b_stride, device=device, dtype=dtype)
        for t in (a, b):
            t.copy_(torch.randn(t.shape, device=device))
        jagged = self.a_shape[0] if len(self.b_shape) == 3 else self.a_shape[1]  # rows, or K of a weight gradient
        offs = torch.arange(1, groups + 1, device=device, dtype=torch.int32) * (jagged // groups)
        offs[-1] = jagged
        return a, b, offs

    def seconds(self, device: torch.device, dtype: torch.dtype, groups: int, repeats: int) -> float:
        """Median seconds of one `torch._grouped_mm` at these shapes and layouts, over `groups` equal groups."""
        a, b, offs = self.operands(device, dtype, groups)
        return median_seconds(lambda: torch._grouped_mm(a, b, offs=offs), device, repeats)


def describe(shape: tuple[int, ...], stride: tuple[int, ...]) -> str:
    """'65536x768 row-major', '8x768x3072 col-major': the order of the last two dimensions in memory."""
    major = "row-major" if stride[-1] == 1 else "col-major" if stride[-2] == 1 else f"strides {stride}"
    return f"{'x'.join(map(str, shape))} {major}"


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "_grouped_mm":
            a, b = args[0], args[1]
            self.calls.append((tuple(a.shape), tuple(a.stride()), tuple(b.shape), tuple(b.stride()), tuple(out.shape)))
        return out


def record_calls(moe: MoE, x: torch.Tensor) -> list[tuple]:
    """Every `_grouped_mm` call (a shape, a stride, b shape, b stride, out shape) of moe's forward and backward
    on x, in call order."""
    with _Record() as rec:
        y, _, _ = moe(x)
        y.backward(torch.ones_like(y))
    return rec.calls


def grouped_gemms(cfg: ModelConfig, n_tokens: int, fake: bool = True) -> list[GroupedGemm]:
    """The distinct grouped GEMMs of one MoE layer's training step over n_tokens tokens, as the model calls
    them in bf16 (the grouped kernel's dtype; the layouts do not depend on it, and the op's meta function takes
    bf16 only). `fake` runs at no cost under FakeTensorMode; fake=False runs it for real (small sizes only)."""
    if not cfg.is_moe:
        return []
    dtype = torch.bfloat16
    moe = MoE(cfg).to(dtype)
    moe.kernel = "grouped"
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        x = torch.randn(1, n_tokens, cfg.d_model, dtype=dtype, requires_grad=True)
        calls = record_calls(moe, x)
    E, D, F = cfg.num_experts, cfg.d_model, cfg.d_ff
    w13 = (E, F, D)  # w1 and w3 as stored; w2 is (E, D, F)
    found: dict[tuple, GroupedGemm] = {}
    for i, (a_shape, a_stride, b_shape, b_stride, out_shape) in enumerate(calls):
        if i < 3:  # the forward: w1, w3, then w2
            role = "w2 fwd" if i == 2 else "w1/w3 fwd"
        elif len(b_shape) == 2:  # both operands 2-D, one output per expert: a weight gradient, grad^T @ input
            role = "w1/w3 wgrad" if out_shape == w13 else "w2 wgrad"
        else:  # an input gradient: the b operand is the weight as stored
            role = "w1/w3 dgrad" if b_shape == w13 else "w2 dgrad"
        key = (role, a_shape, a_stride, b_shape, b_stride, out_shape)
        g = found.get(key)
        found[key] = GroupedGemm(*key, count=g.count + 1 if g else 1)
    return list(found.values())
