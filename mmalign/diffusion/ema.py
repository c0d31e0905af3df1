"""Exponential moving average of the backbone weights (the weights diffusion models are sampled with).

Built on ``torch.optim.swa_utils.AveragedModel`` (its deep copy, its ``n_averaged`` counter, its
buffer sync), with a warm-up decay ``d_t = min(decay, (1 + t) / (10 + t))`` in place of the fixed
one of ``get_ema_multi_avg_fn``: at 2k steps with d = 0.9999 a fixed decay would still sample
mostly the random initial weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class EMA(AveragedModel):
    """``ema = d * ema + (1 - d) * online`` per ``update``; buffers are copied, not averaged.

    The copy starts equal to ``model`` (``n_averaged = 1``), so the first update already averages
    instead of AveragedModel's plain copy. Build it before any forward hook is attached to
    ``model``: deepcopy would copy the hook too. Always in eval mode (no dropout when sampling).
    The weights live at ``ema.module`` and are saved in the checkpoint with the counter.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}.")
        super().__init__(model, multi_avg_fn=self._lerp, use_buffers=False)
        self.module.eval()
        self.module.requires_grad_(False)
        self.n_averaged.fill_(1)
        self.decay, self.warmup = decay, warmup
        self._d = decay

    def _lerp(self, ema: list[Tensor], online: list[Tensor], num_averaged: Tensor) -> None:
        torch._foreach_lerp_(ema, online, 1.0 - self._d)

    def train(self, mode: bool = True) -> "EMA":
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average ``model`` in at global step ``step`` (the warm-up follows the step, so a resumed
        run continues the same schedule)."""
        self._d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        self.update_parameters(model)
