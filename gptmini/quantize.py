"""Weight-only int8 for deployment: `quantize.apply(model, "int8")` after loading, before generating.

Every matmul weight becomes int8 with one fp32 scale per output row (symmetric, absmax / 127): the attention
and dense SwiGLU Linears, the stacked MoE experts (which nn.Linear quantizers never see), and the embedding,
which a tied model shares with the output head (the largest matrix of a small model: one int8 table and one
scale vector serve both). The router gate and the norms stay in full precision: they are tiny, and routing
decides which experts run at all.

Why not torchao: torchao 0.18's `Int8WeightOnlyConfig` on this CPU (torch 2.13) runs the demo model's
output head 8x slower than fp32 at batch 1 (124 ms against 15 ms, 256x100352), because it dequantizes the
whole weight for each call. PyTorch's own CPU kernel `aten._weight_int8pack_mm` (the one gpt-fast uses)
reads the int8 weight directly, but only with bf16 activations (fp32 ones run 2x slower than fp32 weights)
and only when in_features is a multiple of 16: other shapes crash the process, so they take the
dequantizing path here. On other devices the weight is dequantized per call, which is correct everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptmini.errors import UserError
from gptmini.model import GPTOSSMini, MoE

MODES = ("none", "int8")


class QuantizeError(UserError):
    """An unknown mode, or a model that cannot take it."""


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(..., N, K) float -> (..., N, K) int8 and (..., N) fp32 scales with weight ~= int8 * scale[..., None]."""
    scale = (weight.detach().float().abs().amax(dim=-1) / 127.0).clamp(min=1e-12)  # an all-zero row stays zero
    q = (weight.detach().float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale  # row-major whatever the weight's layout: the int8 kernel reads it so


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x @ (weight * scale[:, None]).T for an int8 (N, K) weight, in x's dtype."""
    if x.device.type == "cpu" and weight.shape[1] % 16 == 0:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (M, K): the kernel takes 2-D bf16 only
        y = torch.ops.aten._weight_int8pack_mm(flat, weight, scale.to(torch.bfloat16))  # (M, N)
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scale", scale)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, for code that reads it directly (the model's chunked loss)."""
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.weight_int8, self.scale)


class Int8Embedding(nn.Module):
    def __init__(self, weight: Tensor, scale: Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, idx: Tensor) -> Tensor:
        return (self.weight_int8[idx].float() * self.scale[idx, None]).to(self.dtype)  # (B, T, D)


class Int8MoE(MoE):
    """The same routing (MoE.forward); the experts run one at a time on int8 weights."""

    def __init__(self, moe: MoE):
        nn.Module.__init__(self)  # not MoE.__init__: it would allocate a second set of full-precision experts
        self.num_experts, self.top_k, self.gate = moe.num_experts, moe.top_k, moe.gate
        for name in ("w1", "w2", "w3"):
            q, s = quantize_rows(getattr(moe, name))  # (E, N, K), (E, N)
            self.register_buffer(f"{name}_int8", q)
            self.register_buffer(f"{name}_scale", s)

    def experts_grouped(self, x: Tensor, weights: Tensor, experts: Tensor, load: Tensor) -> Tensor:
        return self.experts_looped(x, weights, experts, load)  # torch._grouped_mm has no int8-weight form

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e's SwiGLU on its int8 weights, for MoE.experts_looped's loop."""
        gate = F.silu(int8_linear(x, self.w1_int8[e], self.w1_scale[e]))  # (n_e, F)
        h = gate * int8_linear(x, self.w3_int8[e], self.w3_scale[e])  # (n_e, F)
        return int8_linear(h, self.w2_int8[e], self.w2_scale[e])  # (n_e, D)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding, Int8MoE)) for m in model.modules())


def check_mode(mode: str | None) -> str:
    mode = mode or "none"
    if mode not in MODES:
        raise QuantizeError(f"unknown quantize mode {mode!r}; choose one of: {', '.join(MODES)}")
    return mode


@torch.no_grad()
def apply(model: GPTOSSMini, mode: str | None) -> GPTOSSMini:
    """Prepare `model` in place for inference and return it: "none" (or None) keeps its weights, laid out for
    decoding on a CPU (`GPTOSSMini.decode_layout`); "int8" quantizes them."""
    if check_mode(mode) == "none":
        if isinstance(model, GPTOSSMini) and model.norm.weight.device.type == "cpu" and not is_quantized(model):
            model.decode_layout()
        return model
    if not isinstance(model, GPTOSSMini):
        raise QuantizeError(f"cannot quantize a {type(model).__name__}: pass the bare GPTOSSMini (before DDP, FSDP "
                            f"or torch.compile wrap it)")
    if is_quantized(model):
        raise QuantizeError("the model is already quantized; load it again in full precision to quantize it")
    model.eval().requires_grad_(False)
    q, s = quantize_rows(model.tok_embeddings.weight)
    model.tok_embeddings = Int8Embedding(q, s, model.tok_embeddings.weight.dtype)
    if model.config.tie_embeddings:
        model.output = Int8Linear(q, s)  # the same tensors: the table stays one table
    for module in list(model.modules()):
        if isinstance(module, MoE):
            continue  # its router gate stays full precision, and Int8MoE takes it over
        for name, child in list(module.named_children()):
            if isinstance(child, MoE):
                setattr(module, name, Int8MoE(child))
            elif isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(*quantize_rows(child.weight)))
    for p in model.parameters():
        # Weights loaded from safetensors are views of one mapping of the file, which quantizing has read whole:
        # one norm left pointing into it kept all of it resident (the demo model: 257 MiB where 38 are int8).
        p.data = p.data.clone()
    return model
