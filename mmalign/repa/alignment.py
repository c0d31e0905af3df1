"""REPA / U-REPA alignment: forward-hook capture, projector, cosine and manifold losses.

Shapes: student hidden states are ``(B, N, C)`` tokens (DiT) or a ``(B, C, h, w)`` map (U-Net
stages); teacher targets are ``(B, G*G, D)`` tokens on the alignment grid ``G``.

* REPA (Yu et al.): ``L_cos = -mean_{b,n} cos(proj(h)[b, n], y[b, n])``; projector per token
  Linear-SiLU-Linear-SiLU-Linear.
* U-REPA (Tian et al.): at the U-Net middle stage, project per token **then** upsample the
  projected grid to ``G`` (bilinear), and add
  ``L_manifold = mean((S(proj) - S(y))**2)`` where ``S`` is a cosine self-similarity matrix:
  ``token`` mode, ``N x N`` within each image; ``sample`` mode, ``B x B`` between the images of the
  batch at each token position (the paper's text allows both readings). The mean over the matrix
  entries is the squared Frobenius distance divided by the entry count, which keeps ``w``
  independent of the grid and batch size.

Both losses run in float32 with autocast off: REPA notes fp16 cosines turn into NaNs late in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MANIFOLD_MODES = ("token", "sample")


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


class HookCapture:
    """Forward hook that keeps the output of one backbone module while ``active``.

    The hook stores a reference (no copy), so the alignment loss back-propagates into exactly the
    blocks up to the hook point.
    """

    def __init__(self, module: nn.Module) -> None:
        self.active = False
        self.value: Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output) -> None:
        if self.active:
            self.value = output[0] if isinstance(output, tuple) else output

    def pop(self) -> Tensor:
        if self.value is None:
            raise RuntimeError("the alignment hook captured nothing: the hooked module did not run in this forward.")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()
