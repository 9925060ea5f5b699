"""GPT-OSS-mini: a decoder-only transformer in the Llama/Mixtral family, in paper order.

ModelConfig → RMSNorm → RoPE → Attention (GQA, optional sliding window) → SwiGLU → MoE → Block → GPTOSSMini.

Conventions are the ones Hugging Face's Llama and Mixtral run (pinned by tests/test_hf.py): RoPE rotates the
two halves of each head (`rotate_half`), RMSNorm normalises in fp32, SwiGLU is `w2(silu(w1 x) * w3 x)`, and
routing is softmax → top-k → renormalise. This module never imports torch.distributed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ROPE_SCALINGS = (None, "ntk")


@dataclass
class ModelConfig:
    # The seed notebook's keys, with its values as defaults: `GPTOSSMini(**seed_config)` works verbatim.
    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 3
    d_ff: int = 3072
    num_experts: int = 8
    top_k: int = 2
    max_seq_len: int = 2048
    dropout: float = 0.1
    # Positions.
    rope_theta: float = 10000.0
    rope_scaling: str | None = None  # None or "ntk" (dynamic NTK-aware, only beyond max_seq_len)
    rope_factor: float = 4.0
    sliding_window: int | None = None  # attend to at most this many most recent tokens (self included)
    # Everything else.
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    aux_loss_coef: float = 0.01
    tokenizer: str = "cl100k_base"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"pick n_heads among the divisors of d_model (e.g. {_divisor_near(self.d_model, self.n_heads)})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim=d_model/n_heads={self.head_dim} must be even for RoPE; change n_heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; pick n_kv_heads among "
                f"the divisors of n_heads (1 = MQA, n_heads = MHA, e.g. {_divisor_near(self.n_heads, self.n_kv_heads)})"
            )
        if self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts} must be >= 0 (0 or 1 = dense SwiGLU)")
        if self.is_moe and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}; "
                f"lower top_k or raise num_experts"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling={self.rope_scaling!r} is not supported; use one of {ROPE_SCALINGS}")
        if self.rope_factor < 1.0:
            raise ValueError(f"rope_factor={self.rope_factor} must be >= 1")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be None or a positive integer")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019), computed in fp32 like Llama."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


# RoPE (Su et al., 2021), half-split layout as in HF Llama: dims i and i + head_dim/2 form a rotated pair.


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)


def ntk_theta(config: ModelConfig, seq_len: int) -> float:
    """Dynamic NTK-aware scaling (bloc97; "dynamic" in HF): grow the base only once the sequence outgrows
    max_seq_len, so nothing changes inside the trained length."""
    if config.rope_scaling != "ntk" or seq_len <= config.max_seq_len:
        return config.rope_theta
    hd, f = config.head_dim, config.rope_factor
    return config.rope_theta * (f * seq_len / config.max_seq_len - (f - 1)) ** (hd / (hd - 2))


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    freqs = positions[..., None].float() * inv_freq  # (B|1, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B|1, 1, T, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def attention_mask(qpos: Tensor, kpos: Tensor, window: int | None) -> Tensor:
    """Boolean (B, 1, Tq, Tk) mask from absolute positions; kpos < 0 marks padding or an empty cache slot."""
    dist = qpos[:, :, None] - kpos[:, None, :]  # (B, Tq, Tk)
    allowed = (kpos[:, None, :] >= 0) & (dist >= 0)
    if window is not None:
        allowed &= dist < window
    return allowed[:, None]


def causal_mask(T: int, window: int | None, device: torch.device) -> Tensor | None:
    """The mask of a sequence's first T tokens attending to themselves; None means plain causal attention
    (SDPA's is_causal, the fast kernels)."""
    if window is None or T <= window:
        return None
    pos = torch.arange(T, device=device)[None]  # (1, T)
    return attention_mask(pos, pos, window)


class KVCache:
    """The one KV cache: `batch` rows, each holding its own sequence with its own length, so a sequence can
    start or end between any two forwards (continuous batching) and a batch of one is just a batch. Only the
    n_kv_heads heads are kept (GQA's memory saving).

    Before each forward one call says what it computes: `prefill(row)` the next T tokens of one row's
    sequence (a (1, T) input: its whole prompt, or a chunk of it after the chunks already in), `decode(n)` one
    token for each of rows 0..n-1 (an (n, 1) input), `mixed(n)` both at once (a (1, n + T) input: rows
    0..n-1's next tokens, then a chunk of row n's prompt), `at(positions)` every row at the same positions held
    on the device (for graph capture: no host sync, same shapes every step).

    Position p of a row lives in column p % size; with a sliding window, size is the window and each row is
    a ring buffer, and `pos` records which position each column holds, so masks need no reordering. Running
    rows are kept first so a decode step reads the cache as a view; `move` fills the hole a finished
    sequence leaves. `max_len` is the longest sequence a row will hold: it fixes the NTK RoPE base.
    """

    def __init__(self, config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype,
                 max_len: int | None = None):
        self.max_len = max_len or config.max_seq_len
        self.size = min(self.max_len, config.sliding_window or self.max_len)
        self.window = config.sliding_window
        shape = (config.n_layers, batch, config.n_kv_heads, self.size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.full((batch, self.size), -1, device=device, dtype=torch.long)  # (B, S)
        self.lengths = [0] * batch  # tokens each row holds; kept on the host, so a step needs no sync
        self.mode = "prefill"
        self.row, self.rows, self.positions = 0, 0, None

    def prefill(self, row: int) -> None:
        self.mode, self.row = "prefill", row

    def decode(self, n: int) -> None:
        self.mode, self.rows = "decode", n

    def mixed(self, n: int) -> None:
        """decode(n) and prefill(n) in one forward: a (1, n + T) input holds rows 0..n-1's next tokens, then
        the next T tokens of row n's prompt (Sarathi's piggybacking: the chunk rides in the decode's matmuls)."""
        self.mode, self.rows, self.row = "mixed", n, n

    def use(self, part: str) -> None:
        """Inside a mixed forward: the next `update` is the decode rows' ("decode") or the chunk's ("prefill")."""
        self.mode = part
        if part != "mixed":
            self.cols, self.index, self.width = self.parts[part]

    def at(self, positions: Tensor) -> None:
        self.mode, self.positions = "at", positions

    def reset(self, row: int) -> None:
        self.pos[row] = -1
        self.lengths[row] = 0

    def begin(self, T: int) -> tuple[Tensor, Tensor | None]:
        """Positions (B|1, T) and attention mask of the forward about to run; records where it writes. A mixed
        forward's mask is a pair: the decode rows' and the chunk's."""
        device = self.pos.device
        if self.mode == "mixed":
            n, self.parts = self.rows, {}
            for part, t in (("decode", 1), ("prefill", T - self.rows)):
                self.mode = part
                qpos, mask = self.begin(t)
                self.parts[part] = (self.cols, getattr(self, "index", None), self.width, qpos, mask)
            self.mode = "mixed"
            (_, _, _, qd, md), (_, _, _, qp, mp) = self.parts["decode"], self.parts["prefill"]
            self.parts = {k: v[:3] for k, v in self.parts.items()}
            return torch.cat([qd[:, 0], qp[0]])[None], (md, mp)  # (1, n + T)
        if self.mode == "at":
            cols = torch.arange(self.size, device=device)
            return self.positions[None], (cols[None, :] <= self.positions[:, None])[None, None]  # (1, 1, T, S)
        if self.mode == "decode":
            if T != 1:
                raise ValueError(f"a decode step takes one token per row (got {T})")
            lengths = self.lengths[: self.rows]
            qpos = torch.tensor(lengths, device=device)[:, None]  # (n, 1)
            self.cols, self.index = qpos[:, 0] % self.size, torch.arange(self.rows, device=device)
            self.pos[self.index, self.cols] = qpos[:, 0]
            # Columns past the longest row hold nothing yet: attend only up to it.
            self.width = min(self.size, max(lengths) + 1)
            self.lengths[: self.rows] = [length + 1 for length in lengths]
            return qpos, attention_mask(qpos, self.pos[: self.rows, : self.width], self.window)
        start, r = self.lengths[self.row], self.row
        qpos = torch.arange(start, start + T, device=device)[None]  # (1, T)
        # A chunk after the first attends to the row's cached columns (read before this chunk overwrites any
        # of a ring's) and to itself.
        self.width = min(self.size, start)
        if start:
            kpos = torch.cat([self.pos[r, : self.width], qpos[0]])[None]  # (1, width + T)
            mask = attention_mask(qpos, kpos, self.window)
        else:
            mask = causal_mask(T, self.window, device)
        n = min(T, self.size)
        self.cols = torch.arange(start + T - n, start + T, device=device) % self.size
        self.pos[r, self.cols] = qpos[0, -n:]
        self.lengths[r] = start + T
        return qpos, mask

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this forward's keys/values (B, nkv, T, hd); return what its queries attend to."""
        if self.mode == "at":
            self.k[layer].index_copy_(2, self.positions, k.to(self.k.dtype))
            self.v[layer].index_copy_(2, self.positions, v.to(self.v.dtype))
            return self.k[layer], self.v[layer]
        if self.mode == "decode":
            self.k[layer][self.index, :, self.cols] = k[:, :, 0].to(self.k.dtype)  # (n, nkv, hd)
            self.v[layer][self.index, :, self.cols] = v[:, :, 0].to(self.v.dtype)
            n, w = self.rows, self.width
            return self.k[layer, :n, :, :w], self.v[layer, :n, :, :w]
        r, w = self.row, self.width
        if w:
            k_all = torch.cat([self.k[layer, r : r + 1, :, :w].to(k.dtype), k], dim=2)  # (1, nkv, w + T, hd)
            v_all = torch.cat([self.v[layer, r : r + 1, :, :w].to(v.dtype), v], dim=2)
        else:
            k_all, v_all = k, v
        n = self.cols.numel()
        self.k[layer, r].index_copy_(1, self.cols, k[0, :, -n:].to(self.k.dtype))
        self.v[layer, r].index_copy_(1, self.cols, v[0, :, -n:].to(self.v.dtype))
        return k_all, v_all

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s sequence continues in row `dst`."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.pos[dst] = self.pos[src]
        self.lengths[dst] = self.lengths[src]


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (Ainslie et al., 2023): n_kv_heads K/V heads are
    shared by groups of n_heads // n_kv_heads query heads; 1 gives MQA, n_heads gives MHA."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.dropout = config.dropout
        self.wq = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
        cache: KVCache | None = None
    ) -> Tensor:
        B, T, _ = x.shape
        # -1, not n_heads: under tensor parallelism each rank holds n_heads/tp of the heads.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and cache.mode == "mixed":
            return self.wo(self.mixed(q, k, v, mask, cache))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # SDPA picks flash/cuDNN/memory-efficient kernels on GPU; mask=None keeps the flash path open.
        y = sdpa_gqa(q, k, v, mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hd)
        return self.wo(y)

    def mixed(self, q: Tensor, k: Tensor, v: Tensor, masks: tuple, cache: KVCache) -> Tensor:
        """Attention of a mixed forward (KVCache.mixed): the first n tokens are n rows' decode tokens, each
        attending to its own row, the rest one row's prompt chunk."""
        n, T = cache.rows, q.size(2)

        def rows(t: Tensor) -> Tensor:
            return t[0, :, :n].transpose(0, 1)[:, :, None]  # (1, h, n, hd) -> (n, h, 1, hd)

        cache.use("decode")
        kd, vd = cache.update(self.layer, rows(k), rows(v))
        yd = sdpa_gqa(rows(q), kd, vd, masks[0], 0.0)  # (n, nh, 1, hd)
        cache.use("prefill")
        kp, vp = cache.update(self.layer, k[:, :, n:], v[:, :, n:])
        yp = sdpa_gqa(q[:, :, n:], kp, vp, masks[1], 0.0)  # (1, nh, T - n, hd)
        cache.use("mixed")
        y = torch.cat([yd[:, :, 0].transpose(0, 1)[None], yp], dim=2)  # (1, nh, T, hd)
        return y.transpose(1, 2).reshape(1, T, -1)  # (1, T, nh*hd)


def sdpa_gqa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p, enable_gqa=True
        )
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p)


_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer, 2020), as in Llama."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on (the RMSNorm before the experts returns fp32)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


EXPERT_KERNELS = ("auto", "grouped", "looped")


def expert_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The MoE kernel for experts computing in `dtype` on `device`: `grouped` where torch._grouped_mm has its
    fused, sync-free kernel (bf16 on CUDA sm90+: H100, H200); elsewhere `looped`, since _grouped_mm's fallback
    is itself a host-synchronising loop and the explicit one runs in any dtype. Asked once, outside forward:
    a torch.cuda call inside a compiled region is traced on every call."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return "looped"
    return "grouped" if torch.cuda.get_device_capability(device) >= (9, 0) else "looped"


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts with Mixtral routing (Jiang et al., 2024): softmax over experts,
    keep the top-k, renormalise their weights. Dropless: every token reaches its k experts.

    Expert weights are stacked, (E, d_ff, d_model) for w1/w3 and (E, d_model, d_ff) for w2 (each slice an
    nn.Linear weight), so all experts run as one grouped matmul over the tokens sorted by expert.
    `kernel` ("grouped" or "looped") is set by GPTOSSMini.set_expert_kernel from the device and dtype.
    """

    kernel = "looped"
    # Set by gptmini.parallel, which owns the process groups (this module never imports torch.distributed):
    # `expert_parallel` moves tokens to the ranks that hold their experts and back (dispatch/combine/local),
    # and under tensor parallelism marks the router's input and weights for the gradients' sums;
    # `data_mean` averages a router statistic over the data-parallel ranks, so the balance loss is the one
    # process's over the global batch.
    expert_parallel = None
    data_mean = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, F_ = config.num_experts, config.d_model, config.d_ff
        self.num_experts, self.top_k = E, config.top_k
        self.gate = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, F_, D))
        self.w2 = nn.Parameter(torch.empty(E, D, F_))
        self.w3 = nn.Parameter(torch.empty(E, F_, D))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the output, the load-balancing loss and the tokens routed to each expert."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D)
        ep = self.expert_parallel
        probs = self.gate(x if ep is None else ep.router_input(x)).float().softmax(dim=-1)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # one_hot with an explicit size and a sum: no host sync (unlike bincount) and deterministic.
        load = F.one_hot(experts.flatten(), self.num_experts).sum(dim=0)  # (E,)
        if self.expert_parallel is not None:
            y = self.experts_dispatched(x.to(compute_dtype(x)), weights, experts, load)
        elif self.kernel == "grouped":
            y = self.experts_grouped(x.to(compute_dtype(x)), weights, experts, load)
        else:
            y = self.experts_looped(x, weights, experts, load)
        return y.view(B, T, D), self.balance_loss(probs, load), load

    def balance_loss(self, probs: Tensor, load: Tensor) -> Tensor:
        """Switch Transformer's aux loss E * sum_i f_i * P_i (Fedus et al., 2021) with f_i the fraction of the
        N*k routing slots sent to expert i and P_i its mean router probability: 1.0 when perfectly balanced."""
        f, p = load.float() / load.sum(), probs.mean(dim=0)
        if self.data_mean is not None:
            f, p = self.data_mean(f), self.data_mean(p)
        return self.num_experts * (f * p).sum()

    def experts_grouped(self, x: Tensor, weights: Tensor, experts: Tensor, load: Tensor) -> Tensor:
        N, D = x.shape
        order = experts.flatten().argsort(stable=True)  # (N*k,) routing slots sorted by expert
        xs = x[order // self.top_k]  # (N*k, D)
        # End row of each expert's group, on the device. The last is N*k since routing is dropless: _grouped_mm
        # leaves rows past the last offset unwritten, so a capacity limit would need those rows zeroed.
        offs = load.cumsum(0).to(torch.int32)
        w1, w2, w3 = (w.to(x.dtype).transpose(1, 2) for w in (self.w1, self.w2, self.w3))
        h = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)  # (N*k, F)
        ys = torch._grouped_mm(h, w2, offs=offs)  # (N*k, D)
        # The inverse permutation by a scatter: one pass over the rows, where a second argsort is O(n log n).
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        ys = ys[inverse].view(N, self.top_k, D)  # back to (token, slot) order
        return (ys * weights[..., None].to(ys.dtype)).sum(dim=1)

    def experts_dispatched(self, x: Tensor, weights: Tensor, experts: Tensor, load: Tensor) -> Tensor:
        """Expert parallelism: the routing slots, sorted by expert, travel to the ranks holding their experts
        (`expert_parallel.dispatch`), run there grouped by local expert, and come back in the same order."""
        N, D = x.shape
        ep = self.expert_parallel
        order = experts.flatten().argsort(stable=True)  # (N*k,) routing slots sorted by expert
        xs, counts, route = ep.dispatch(x[order // self.top_k], load)  # (M, D) by local expert, (E_local,)
        ys = sorted_experts(xs, counts, *(ep.local(w).to(x.dtype) for w in (self.w1, self.w2, self.w3)),
                            self.kernel)
        ys = ep.combine(ys, route)  # (N*k, D) in `order`
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        ys = ys[inverse].view(N, self.top_k, D)  # back to (token, slot) order
        return (ys * ep.routing_weights(weights)[..., None].to(ys.dtype)).sum(dim=1)

    def experts_looped(self, x: Tensor, weights: Tensor, experts: Tensor, load: Tensor) -> Tensor:
        y = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(experts == e)  # (n_e,) each: its shape already waits on the device
            if token.numel() == 0:  # an idle expert (most of them while decoding one token)
                continue
            y.index_add_(0, token, (self.expert(e, x[token]) * weights[token, slot, None]).to(y.dtype))
        return y

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e's SwiGLU on its tokens x (n_e, D) -> (n_e, D)."""
        return (F.silu(x @ self.w1[e].T) * (x @ self.w3[e].T)) @ self.w2[e].T


def sorted_experts(xs: Tensor, counts: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, kernel: str) -> Tensor:
    """SwiGLU experts on rows grouped by expert: xs (M, D), counts (E,) rows per expert, w1/w3 (E, F, D),
    w2 (E, D, F) -> (M, D)."""
    if kernel == "grouped":
        offs = counts.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)) * torch._grouped_mm(xs, w3.transpose(1, 2), offs=offs)
        return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    ys = [(F.silu(x @ w1[e].T) * (x @ w3[e].T)) @ w2[e].T
          for e, x in enumerate(xs.split(counts.tolist())) if x.numel()]
    return torch.cat(ys) if ys else xs * 0  # still in the graph: the combine's backward is collective


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.feed_forward = MoE(config) if config.is_moe else SwiGLU(config.d_model, config.d_ff)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
        cache: KVCache | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x = x + self.drop(self.attention(self.attention_norm(x), cos, sin, mask, cache))
        if isinstance(self.feed_forward, MoE):
            y, aux, load = self.feed_forward(self.ffn_norm(x))
            return x + self.drop(y), aux, load
        return x + self.drop(self.feed_forward(self.ffn_norm(x))), None, None


class GPTOSSMini(nn.Module):
    """`GPTOSSMini(**seed_config)` or `GPTOSSMini(ModelConfig(...))` (named presets: `gptmini.config.model_preset`).

    After each forward, `last_aux_loss` holds the load-balancing loss (mean over layers; 0 for a dense model)
    and `last_expert_load` the tokens routed to each expert summed over layers ((E,) tensor, None if dense).
    """

    def __init__(self, config: ModelConfig | None = None, **seed_keys):
        super().__init__()
        if config is not None and seed_keys:
            raise ValueError(f"pass either a ModelConfig or config keys, not both (got {sorted(seed_keys)})")
        self.config = config = config if config is not None else ModelConfig.from_dict(seed_keys)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta), persistent=False)
        self.last_aux_loss: Tensor = torch.zeros(())
        self.last_expert_load: Tensor | None = None
        self.expert_choice: tuple[str, torch.dtype | None] = ("auto", None)
        self.reset_parameters()

    def _apply(self, fn, recurse: bool = True):
        # `model.to(torch.bfloat16)` would round the RoPE frequencies too, turning position 2047 by up to
        # 0.9 rad more or less than training did; they are recomputed in fp32 on the new device instead.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta).to(self.inv_freq.device)
        self.set_expert_kernel(*self.expert_choice)  # the device or dtype may have changed
        return self

    def set_expert_kernel(self, kernel: str = "auto", compute_dtype: torch.dtype | None = None) -> str:
        """Sets every MoE layer's `kernel` and returns it. `auto` asks `expert_kernel` for the weights' device
        and `compute_dtype`: the dtype the matmuls run in, the weights' own unless autocast changes it (the
        trainer passes bf16 for bf16 autocast). Kept across `.to()`, which re-chooses for the new device."""
        if kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert kernel {kernel!r} is unknown; choose one of: {', '.join(EXPERT_KERNELS)}")
        self.expert_choice = (kernel, compute_dtype)
        if kernel == "auto":
            w = self.norm.weight  # a full-precision parameter whatever quantization replaced
            kernel = expert_kernel(w.device, compute_dtype or w.dtype)
        for module in self.modules():
            if isinstance(module, MoE):
                module.kernel = kernel
        return kernel

    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere; the projections that write into the residual stream get 0.02/sqrt(2L) so the
        residual's variance does not grow with depth (GPT-2)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", "feed_forward.w2")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def hidden(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """The final-normed hidden states (B, T, d) of tokens idx (B, T): positions 0..T-1 without a cache,
        else the ones the cache's next step holds (KVCache.prefill / decode / at), whose keys and values it
        stores. The output head is `self.output`, applied by the caller to the rows it needs."""
        cfg = self.config
        if cache is None:
            T = idx.size(1)
            qpos, mask = torch.arange(T, device=idx.device)[None], causal_mask(T, cfg.sliding_window, idx.device)
            theta = ntk_theta(cfg, T)
        else:
            qpos, mask = cache.begin(idx.size(1))
            theta = ntk_theta(cfg, cache.max_len)  # fixed for the whole generation, so cached keys stay valid
        inv_freq = self.inv_freq if theta == cfg.rope_theta else rope_inv_freq(cfg.head_dim, theta).to(idx.device)
        cos, sin = rope_cos_sin(qpos, inv_freq)

        x = self.drop(self.tok_embeddings(idx))
        aux, load = [], []
        for block in self.layers:
            x, a, l = block(x, cos, sin, mask, cache)
            if a is not None:
                aux.append(a)
                load.append(l)
        self.last_aux_loss = torch.stack(aux).mean() if aux else torch.zeros((), device=idx.device)
        self.last_expert_load = torch.stack(load).sum(0) if load else None
        return self.norm(x)

    def forward(self, idx: Tensor, *, cache: KVCache | None = None) -> Tensor:
        """Logits (B, T, vocab) of tokens idx (B, T), at the positions `hidden` says. Losses are computed from
        them, or from `hidden` and `output`, by the caller (`gptmini.loss`)."""
        return self.output(self.hidden(idx, cache))

    @torch.no_grad()
    def decode_layout(self) -> GPTOSSMini:
        """Stores every matmul weight transposed in memory, column-major (same shapes, same values), and returns
        the model: for decoding on a CPU. At batch 1 each matmul is a matrix-vector product; with W (N, K)
        row-major, x @ W.T runs as N short dot products, which on the 2-core dev VM read the demo's output head
        at 7 GB/s, while with W column-major W.T is a row-major (K, N) that the product streams at 21 GB/s
        (BENCHMARKS.md, "Decode"). For inference only: training keeps the row-major layout, and safetensors
        saves contiguous tensors only."""
        laid_out = set()
        for module in self.modules():
            if isinstance(module, nn.Linear):  # a tied output head re-lays the embedding table with it
                module.weight.data = module.weight.data.t().contiguous().t()
                laid_out.add(id(module.weight))
            elif isinstance(module, MoE):
                for w in (module.w1, module.w2, module.w3):  # each expert's (N, K) slice column-major
                    w.data = w.data.transpose(1, 2).contiguous().transpose(1, 2)
                    laid_out.add(id(w))
        for p in self.parameters():
            # Weights loaded from safetensors are views of one mapping of the file, which this has read whole:
            # one norm left pointing into it would keep all of it resident beside the copies.
            if id(p) not in laid_out:
                p.data = p.data.clone()
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied embedding counts once

    def num_active_params(self) -> int:
        """Parameters that touch each token: the idle experts (E - k per layer) do not."""
        cfg = self.config
        if not cfg.is_moe:
            return self.num_params()
        idle = (cfg.num_experts - cfg.top_k) * 3 * cfg.d_model * cfg.d_ff * cfg.n_layers
        return self.num_params() - idle

    def flops_per_token(self, seq_len: int, causal: bool = False) -> int:
        """Training FLOPs per token (`training_flops`) over the active parameters. The embedding lookup is no
        matmul, but a tied table is also the output projection."""
        cfg = self.config
        n = self.num_active_params()
        if not cfg.tie_embeddings:
            n -= cfg.vocab_size * cfg.d_model
        return training_flops(n, cfg.n_layers, cfg.d_model, seq_len, cfg.sliding_window, causal)


def training_flops(matmul_params: int, n_layers: int, attn_dim: int, seq_len: int,
                   sliding_window: int | None = None, causal: bool = False) -> int:
    """Training FLOPs per token, forward + backward (PaLM, appendix B; nanoGPT's estimate_mfu):
    6 * matmul_params + 12 * n_layers * attn_dim * context.

    6 = 2 FLOPs per multiply-add forward and 4 backward (input and weight gradients). The attention term is
    QK^T and PV, 2 * context * attn_dim each per layer forward (attn_dim = n_heads * head_dim), times 3 for
    the backward. It counts the full context x context score matrix, as PaLM and nanoGPT do, so MFU compares
    with their published figures; `causal` counts only the unmasked half that a causal flash kernel computes.
    """
    context = min(seq_len, sliding_window or seq_len)  # keys each query attends to
    return 6 * matmul_params + (6 if causal else 12) * n_layers * attn_dim * context
