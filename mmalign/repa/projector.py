"""The REPA projector: per-token MLP from the student's hidden width to the teacher's, then
(U-REPA) bilinear upsampling of the projected grid to the teacher grid.

Student hidden states are ``(B, N, C)`` tokens (DiT) or a ``(B, C, h, w)`` map (U-Net stages). U-REPA
projects first and upsamples second (the paper's order: the MLP sees the student's own tokens).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def as_tokens(hidden: Tensor) -> tuple[Tensor, int]:
    """``(B, C, h, w)`` or ``(B, N, C)`` -> ``(B, N, C)`` tokens and the (square) grid side."""
    if hidden.ndim == 4:
        return hidden.flatten(2).transpose(1, 2), hidden.shape[-1]
    side = math.isqrt(hidden.shape[1])
    if side * side != hidden.shape[1]:
        raise ValueError(f"hidden states with {hidden.shape[1]} tokens are not a square grid.")
    return hidden, side


class Projector(nn.Module):
    """Per-token MLP ``Linear-SiLU-Linear-SiLU-Linear`` (REPA's 3-layer projector)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.SiLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.mlp(tokens)


class AlignmentHead(nn.Module):
    """Projector, then (U-REPA) bilinear upsampling of the projected grid to ``target_grid``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, target_grid: int) -> None:
        super().__init__()
        self.projector = Projector(in_dim, hidden_dim, out_dim)
        self.target_grid = target_grid

    def forward(self, hidden: Tensor) -> Tensor:
        tokens, side = as_tokens(hidden)
        proj = self.projector(tokens)
        if side != self.target_grid:
            return upsample_tokens(proj, self.target_grid)
        return proj


def upsample_tokens(tokens: Tensor, grid: int) -> Tensor:
    """``(B, g*g, D)`` -> ``(B, grid*grid, D)`` by bilinear resampling of the token grid."""
    b, n, d = tokens.shape
    side = math.isqrt(n)
    fmap = tokens.transpose(1, 2).reshape(b, d, side, side)
    fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)
