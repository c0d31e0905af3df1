"""Optimisation helpers shared by every method."""

from __future__ import annotations

import math


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LR multiplier for ``LambdaLR``: linear warm-up over ``warmup_steps``, then cosine decay to
    ``min_ratio`` at ``total_steps`` (``min_ratio=1`` gives warm-up then constant)."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
