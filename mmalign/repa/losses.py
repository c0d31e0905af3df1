"""REPA / U-REPA alignment losses between projected student tokens and teacher tokens.

Shapes: ``(B, N, D)`` on both sides, ``N = G*G`` tokens of the alignment grid ``G`` (the projector
and its upsampling live in ``projector.py``).

* REPA (Yu et al.): ``L_cos = -mean_{b,n} cos(proj(h)[b, n], y[b, n])``.
* U-REPA (Tian et al.): ``L_manifold = mean((S(proj) - S(y))**2)`` where ``S`` is a cosine
  self-similarity matrix: ``token`` mode, ``N x N`` within each image; ``sample`` mode, ``B x B``
  between the images of the batch at each token position (the paper's text allows both readings).
  The mean over the matrix entries is the squared Frobenius distance divided by the entry count,
  which keeps ``w`` independent of the grid and batch size.

Both losses run in float32 with autocast off: REPA notes fp16 cosines turn into NaNs late in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MANIFOLD_MODES = ("token", "sample")


def _check(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"projected tokens {tuple(pred.shape)} and teacher tokens {tuple(target.shape)} differ; "
                         "the projector output dim must equal the teacher dim and the grids must match.")


def repa_cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``-mean cos`` over batch and tokens: -1 when ``pred`` is a positive multiple of ``target``."""
    _check(pred, target)
    with torch.autocast(pred.device.type, enabled=False):
        return -F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6).mean()


def _selfsim(x: Tensor) -> Tensor:
    x = F.normalize(x, dim=-1, eps=1e-6)
    return x @ x.transpose(-1, -2)


def manifold_loss(pred: Tensor, target: Tensor, mode: str = "token") -> Tensor:
    """Mean squared difference of cosine self-similarity matrices (0 when ``pred == target``)."""
    _check(pred, target)
    if mode not in MANIFOLD_MODES:
        raise ValueError(f"manifold mode must be one of {MANIFOLD_MODES}, got '{mode}'.")
    with torch.autocast(pred.device.type, enabled=False):
        p, t = pred.float(), target.float()
        if mode == "sample":  # (N, B, D): B x B similarities at each token position
            p, t = p.transpose(0, 1), t.transpose(0, 1)
        return (_selfsim(p) - _selfsim(t)).pow(2).mean()
