"""AdamW and its schedule (METHOD.md sec. 8): decay on weights only, linear warm-up, cosine decay."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from tasks.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on >= 2-D weights only: biases, norms, logit scale/bias, log-variances and
    every other 1-D/0-D parameter go without; the frozen EMA teacher is left out."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=tuple(train.betas),
                             eps=train.eps, fused=device.type == "cuda")


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 0, then cosine decay to `min_ratio` of the peak."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup_steps=train.warmup_steps, total_steps=train.steps, min_ratio=train.min_lr / train.lr))
