"""Alignment + uniformity loss of Wang and Isola (2020), for paired image/text features.

    L = align_alpha(f, g) + weight * (uniform_t(f) + uniform_t(g)) / 2
    align_alpha(f, g) = E_i ||f_i - g_i||^alpha                     (positive pairs, alpha = 2)
    uniform_t(f)      = log E_{i != j} exp(-t ||f_i - f_j||^2)       (distinct pairs, t = 2)

on L2-normalised features (the paper's hypersphere). Unlike CLIP/SigLIP it has no temperature: a
model's learnable logit scale (and bias) gets no gradient from it and keeps its initial value.

Multi-process convention (as in ``mmalign.losses.contrastive``): every rank returns a *local* loss
``L_r`` with ``mean_r L_r == global-batch loss`` and, after the gathers' backward, a gradient on its
own features equal to ``W x`` the global-batch gradient, so DDP's 1/W averaging makes it exact.

- Alignment is a mean over pairs: a rank's share is the mean over its own B pairs; no collective.
- Uniformity is the log of a mean over all N(N-1) ordered pairs of the GLOBAL batch, which does not
  split into per-rank terms. Rank r computes ``lse_r = logsumexp_{i in r, j != i} (-t d_ij)`` over its
  B rows against all N gathered columns (B x N memory, not N x N); with ``lse = logsumexp_r lse_r``
  (a gather of W scalars) the global value is ``U = lse - log N(N-1)`` and ``dU/dlse_r = w_r =
  exp(lse_r - lse)``. So each rank returns ``U`` (exact value) plus ``W * w_r * (lse_r - lse_r)`` with
  the second factor differentiated and the rest detached: its gradient is ``W * w_r * dlse_r``, the
  gather's backward sums it over ranks, and every feature receives ``W * dU/df``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmalign.distributed import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size
from mmalign.losses.contrastive import check_features


def align_loss(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """``mean_i ||x_i - y_i||^alpha`` over the rows (positive pairs) given."""
    return (x - y).norm(p=2, dim=1).pow(alpha).mean()


def _local_lse(rows: torch.Tensor, columns: torch.Tensor, offset: int, t: float) -> torch.Tensor:
    """``logsumexp`` of ``-t ||rows_i - columns_j||^2`` over all j except the row itself (column
    ``offset + i``): this rank's part of the uniformity sum, B x N."""
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b; clamped because rounding can make a tiny distance negative
    sq = (rows.pow(2).sum(1, keepdim=True) + columns.pow(2).sum(1)[None, :] - 2 * rows @ columns.T).clamp_min(0)
    logits = -t * sq
    b = rows.shape[0]
    self_pairs = torch.zeros_like(logits, dtype=torch.bool)
    self_pairs[torch.arange(b), torch.arange(offset, offset + b)] = True
    return torch.logsumexp(logits.masked_fill(self_pairs, float("-inf")).flatten(), dim=0)


def uniform_loss(x: torch.Tensor, t: float = 2.0, local_only: bool = False) -> torch.Tensor:
    """``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` over the global batch (this rank's share, see the
    module docstring); ``local_only``: over this rank's rows alone, no collective."""
    rank, world = (0, 1) if local_only else (get_rank(), get_world_size())
    b = x.shape[0]
    n = b * world
    if world == 1:
        return _local_lse(x, x, 0, t) - math.log(n * (n - 1))
    columns = all_gather_with_grad(x, check_sizes=False)  # shapes were checked by check_features
    lse_r = _local_lse(x, columns, rank * b, t)
    lse_all = all_gather_no_grad(lse_r.detach().reshape(1), check_sizes=False)
    lse = torch.logsumexp(lse_all, dim=0)
    share = torch.exp(lse_r.detach() - lse)  # dU / dlse_r
    return (lse - math.log(n * (n - 1))) + world * share * (lse_r - lse_r.detach())


class AlignUniformLoss(nn.Module):
    """``align_alpha(f, g) + weight * (uniform_t(f) + uniform_t(g)) / 2`` over the global batch.

    Args:
        alpha: Exponent of the positive-pair distance (the paper's 2).
        t: Uniformity temperature (the paper's 2).
        weight: ``lam``, the weight of the mean uniformity of the two modalities (the paper's 1).
        check_inputs: Validate shapes/NaNs on every rank first (one tiny all-gather, a host sync).
    """

    def __init__(self, alpha: float = 2.0, t: float = 2.0, weight: float = 1.0, check_inputs: bool = True) -> None:
        super().__init__()
        for name, value, zero in (("alpha", alpha, False), ("t", t, False), ("weight", weight, True)):
            if not (value >= 0 if zero else value > 0) or math.isnan(value):
                raise ValueError(f"AlignUniformLoss: {name} must be {'>= 0' if zero else '> 0'}, got {value!r}")
        self.alpha, self.t, self.weight = float(alpha), float(t), float(weight)
        self.check_inputs = bool(check_inputs)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                local_only: bool = False) -> torch.Tensor:
        """Local share of the loss; ``local_only``: this rank's batch alone (evaluation with uneven
        batch counts, where a collective would wait forever)."""
        if local_only and image_features.shape[0] < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 pairs, got {image_features.shape[0]}.")
        if self.check_inputs and not local_only:
            check_features(image_features, text_features, type(self).__name__,
                           no_negatives_why="uniformity is a mean over distinct pairs, and one sample has none.")
        align = align_loss(image_features, text_features, self.alpha)
        if self.weight == 0:
            return align
        uniform = (uniform_loss(image_features, self.t, local_only) + uniform_loss(text_features, self.t, local_only))
        return align + self.weight * uniform / 2
