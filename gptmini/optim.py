"""The optimizer and its schedule: AdamW with decay on matrices only, linear warmup then cosine decay.

The trainer and the benchmarks build their optimizer here, so a benchmark times the step the trainer takes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from gptmini.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (embeddings, projections, experts), not on norm gains or biases; the fused
    kernel where the parameters are on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def get_lr(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to min_lr (the seed's schedule). `step` counts from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
