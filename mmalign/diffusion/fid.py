"""Fréchet distance between generated and real images with a feature network from the teacher registry.

No Inception weights exist offline, so the feature network is any registered teacher (mean-pooled
patch tokens). FD values are comparable only between runs that used the same network: the network's
``describe()`` string is logged with every result for that reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from mmalign.distributed import get_rank, get_world_size


def build_fd_metric(network, where: str = "fd.network"):
    """``(metric, description)``: torchmetrics FID over the pooled features of ``network`` (a
    ``NetworkSpec``).

    Images go in as floats in ``[0, 1]`` (``normalize=True``); real statistics are kept across
    resets (``reset_real_features=False``) so the real set is encoded once per run.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = network.build(where=where)
    metric = FrechetInceptionDistance(feature=net, normalize=True, reset_real_features=False)
    return metric, f"FD[{net.describe()}]"


def to_unit(images: Tensor) -> Tensor:
    """``[-1, 1]`` -> ``[0, 1]`` (clamped: samples overshoot the data range)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def add_real(metric, images: Tensor, num_samples: int) -> None:
    """Add real images (``[-1, 1]``) until this rank holds its share of ``num_samples``; real
    statistics survive ``reset``, so later validations add nothing."""
    need = math.ceil(num_samples / get_world_size()) - int(metric.real_features_num_samples)
    if need > 0:
        metric.update(to_unit(images[:need]), real=True)


@torch.no_grad()
def fd_of_samples(metric, generate: Callable[[Tensor, int], Tensor], num_samples: int, num_classes: int,
                  device: torch.device, batch_size: int = 256) -> Tensor:
    """Feed ``num_samples`` generated images (this rank's share, labels cycling through the classes,
    seeds distinct per rank) to ``metric`` as fakes, compute FD against its real statistics and
    reset the fakes. ``generate(labels, seed)`` returns images in ``[-1, 1]``."""
    n = math.ceil(num_samples / get_world_size())
    rank = get_rank()
    for start in range(0, n, batch_size):
        labels = (torch.arange(start, min(n, start + batch_size), device=device) + rank * n) % num_classes
        metric.update(to_unit(generate(labels, 10_000 * rank + start)), real=False)
    value = metric.compute()
    metric.reset()  # fake statistics only: reset_real_features=False
    return value
