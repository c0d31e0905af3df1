"""Exponential moving average of a network's weights (the weights diffusion models are sampled with)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``ema = d * ema + (1 - d) * online`` after each optimizer step; buffers are copied.

    The warm-up ``d_t = min(decay, (1 + t) / (10 + t))`` stops the random initial weights from
    dominating short runs (at 2k steps with d = 0.9999 the EMA would still be mostly init).
    Build it before any forward hook is attached to ``model``: deepcopy would copy hooks too.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}.")
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    def train(self, mode: bool = True) -> "EMA":
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        ema_p = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            ema_p[name].lerp_(p.detach(), 1.0 - d)
        ema_b = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_b[name].copy_(b)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
