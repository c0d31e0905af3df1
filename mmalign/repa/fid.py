"""Fréchet distance between generated and real images with a feature network from the teacher registry.

No Inception weights exist offline, so the feature network is any registered teacher (mean-pooled
patch tokens). FD values are comparable only between runs that used the same network: the network's
``describe()`` string is logged with every result for that reason.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def build_fd_metric(kind: str, name: str, checkpoint_path: str | None = None, kwargs: dict[str, Any] | None = None):
    """``(metric, description)``: torchmetrics FID over the teacher's pooled features.

    Images go in as floats in ``[0, 1]`` (``normalize=True``); real statistics are kept across
    resets (``reset_real_features=False``) so the real set is encoded once per run.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from mmalign.encoders import build_teacher

    net = build_teacher(kind, name, checkpoint_path, **(kwargs or {}))
    metric = FrechetInceptionDistance(feature=net, normalize=True, reset_real_features=False)
    return metric, f"FD[{net.describe()}]"


def to_unit(images: Tensor) -> Tensor:
    """``[-1, 1]`` -> ``[0, 1]`` (clamped: samples overshoot the data range)."""
    return ((images.float() + 1) / 2).clamp(0, 1)
