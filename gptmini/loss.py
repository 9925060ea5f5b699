"""The losses, computed from what the model returns: the model computes logits (or hidden states) and knows
nothing of targets; training and evaluation choose here how to score them.

- `next_token`: training's loss, the mean cross-entropy of forward's logits (what `gptmini train` runs; under
  tensor parallelism the logits are vocabulary-sharded and `parallel.loss_context` makes it loss_parallel's).
- `chunked`: the same loss and gradients without the (B, T, vocab) logits ever existing whole
  (`chunked_cross_entropy` on the hidden states and the output head), for one process.
- `balance_loss`: the MoE load-balancing term the trainer adds to either.
- `token_losses`: each target's loss, no gradient, for evaluation.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptmini.model import GPTOSSMini, compute_dtype

# (the module that runs forward, tokens (B, T), targets (B, T) with -1 ignored) -> the mean loss
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (B, T, vocab), upcast to fp32, against targets (B, T), -1 ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def next_token(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return cross_entropy(model(x), y)


def chunked(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """`next_token`'s loss and gradients over chunks of tokens. It runs the trunk (`hidden`) and the head
    apart, so only on a model whose head is its own: a DDP wrapper has no `hidden`, FSDP gathers the head in
    forward's hooks, and tensor parallelism shards it over the vocabulary (loss_parallel's case)."""
    if head_sharded(model):
        raise ValueError("the chunked loss runs the model's trunk and head apart, which a head sharded by FSDP "
                         "or tensor parallelism does not allow; use the next_token loss there")
    h = model.hidden(x)  # (B, T, d)
    return chunked_cross_entropy(h.flatten(0, 1), model.output.weight, y.reshape(-1))


def balance_loss(model: nn.Module) -> Tensor | float:
    """aux_loss_coef × the last forward's MoE load-balancing loss, which training adds to the loss; 0 for a
    dense model, a model of another class, or in eval mode."""
    if model.training and isinstance(model, GPTOSSMini) and model.config.is_moe:
        return model.config.aux_loss_coef * model.last_aux_loss
    return 0.0


def token_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(B, T) cross-entropy of each target y (0 where y == -1), no gradient. A model that runs on its own
    scores its hidden states over chunks of rows, so the fp32 logits never exist whole; one whose head is
    sharded (FSDP gathers it in forward's hooks, TP splits it) scores forward's logits, under loss_parallel
    when they are vocab-sharded."""
    if isinstance(model, GPTOSSMini) and not head_sharded(model):
        h = model.hidden(x)  # (B, T, d)
        return token_cross_entropy(h.flatten(0, 1), model.output.weight, y.reshape(-1)).view(y.shape)
    logits = model(x).float()  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1), y.reshape(-1), ignore_index=-1, reduction="none").view(y.shape)


def head_sharded(model: nn.Module) -> bool:
    """Whether the output head is a DTensor (FSDP or tensor parallelism): usable only inside forward."""
    return hasattr(model.output.weight, "device_mesh")


def chunked_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits h @ weight.T against targets (-1 ignored), as F.cross_entropy on fp32
    logits gives, computed over chunks of rows so that the (N, vocab) fp32 logits never exist whole (at
    32k tokens and a 100k vocabulary one fp32 copy is 12 GiB, and the plain path holds several).
    h (N, d), weight (vocab, d), targets (N,). The default chunk keeps a chunk's fp32 logits near 512 MiB."""
    chunk_size = chunk_size or max(1, 2**27 // weight.size(0))
    return _ChunkedCrossEntropy.apply(h, weight, targets, chunk_size)


def token_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """Each row's cross-entropy (N,), 0 where the target is -1, over chunks of rows as chunked_cross_entropy."""
    chunk_size = chunk_size or max(1, 2**27 // weight.size(0))
    dtype = compute_dtype(h)
    w = weight.to(dtype)
    out = torch.empty(h.size(0), device=h.device)
    for s in range(0, h.size(0), chunk_size):
        t = targets[s : s + chunk_size]
        logits = (h[s : s + chunk_size].to(dtype) @ w.T).float()  # (n, vocab)
        loss = logits.logsumexp(dim=-1) - logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
        out[s : s + chunk_size] = loss * (t != -1)
    return out


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The loss is the graph's last node, so its gradients are formed in the forward pass, chunk by chunk,
    while each chunk's logits exist; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        dtype = compute_dtype(h)  # autocast's when on, as nn.Linear would run the head; logits upcast to fp32
        h_all, w = h.to(dtype), weight.to(dtype)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        total = torch.zeros((), device=h.device)
        for s in range(0, h.size(0), chunk_size):
            hc, t = h_all[s : s + chunk_size], targets[s : s + chunk_size]
            valid = (t != -1)[:, None]  # (n, 1)
            t = t.clamp(min=0)[:, None]  # (n, 1)
            logits = (hc @ w.T).float()  # (n, vocab)
            lse = logits.logsumexp(dim=-1, keepdim=True)  # (n, 1)
            total += ((lse - logits.gather(1, t)) * valid).sum()
            if need_grad:
                g = logits.sub_(lse).exp_()  # softmax, in the logits' memory
                g.scatter_add_(1, t, -torch.ones_like(lse))  # d(loss)/d(logits) = softmax - one_hot(target)
                g = (g * valid).to(dtype)
                grad_h[s : s + chunk_size] = g @ w
                grad_w += (g.T @ hc).float()
        count = (targets != -1).sum()
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None
