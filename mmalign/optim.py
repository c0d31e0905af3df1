"""Optimisation helpers shared by every method: one weight-decay rule, one AdamW + schedule set-up."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LR multiplier for ``LambdaLR``: linear warm-up over ``warmup_steps``, then cosine decay to
    ``min_ratio`` at ``total_steps`` (``min_ratio=1`` gives warm-up then constant)."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def decays(name: str, param: torch.Tensor) -> bool:
    """The weight-decay rule: decay weight matrices and kernels only. Biases, norm scales and
    scalars (logit scale and bias) are tensors of fewer than 2 dims; embeddings (token, position,
    class, modality) are tables whose rows a shrinking pull would bias towards zero."""
    return param.ndim >= 2 and "embed" not in name


def param_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups by ``decays``; frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_warmup_cosine(named_parameters, total_steps: int, lr: float, weight_decay: float,
                        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, warmup_steps: int = 0,
                        min_ratio: float = 0.0) -> dict:
    """``configure_optimizers`` return value: AdamW over ``param_groups`` with a per-step linear
    warm-up + cosine schedule (``min_ratio=1``: warm-up, then constant)."""
    opt = torch.optim.AdamW(param_groups(named_parameters, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps, max(1, int(total_steps)), min_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
