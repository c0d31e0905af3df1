"""``TeacherEncoder``: the one interface every frozen vision teacher exposes.

A teacher maps images to patch tokens ``(B, N, D)`` on a square ``grid_size x grid_size`` grid:
tokens after the encoder's final norm, prefix (CLS/register) tokens dropped. A CNN's final feature
map ``(B, D, h, w)`` flattened row-major counts as tokens too, so any backbone can teach.

Inputs: ``forward_tokens`` takes images already resized and normalised for the teacher;
``encode`` takes images in the diffusion range ``[-1, 1]`` at any size and does both steps, so the
callers (alignment loss, FD feature network) never repeat the teacher's preprocessing.

The teacher is frozen: ``requires_grad`` off, eval mode, and ``train()`` cannot switch it back
(Lightning calls ``model.train()`` on the whole tree at every fit start).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GridMismatchError(ValueError):
    """A teacher whose token grid cannot be made equal to the grid the student asks for."""


def tokens_from_features(features: Tensor, num_prefix_tokens: int = 0) -> tuple[Tensor, int]:
    """``(B, D, h, w)`` feature map or ``(B, P + N, D)`` token sequence -> ``(B, N, D)`` and grid side."""
    if features.ndim == 4:
        b, d, h, w = features.shape
        if h != w:
            raise GridMismatchError(f"teacher feature map is {h}x{w}; only square grids are supported.")
        return features.flatten(2).transpose(1, 2), h
    if features.ndim != 3:
        raise ValueError(f"teacher features must be (B, D, h, w) or (B, N, D), got {tuple(features.shape)}.")
    tokens = features[:, num_prefix_tokens:]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise GridMismatchError(f"teacher gives {tokens.shape[1]} patch tokens (after dropping {num_prefix_tokens} "
                                "prefix tokens): not a square grid. Check num_prefix_tokens of this model.")
    return tokens, side


class TeacherEncoder(nn.Module):
    """Base class. Subclasses set ``name``, ``embed_dim``, ``stride`` (input pixels per token),
    ``input_size``, ``mean``, ``std`` and implement ``_features`` and ``_resize``."""

    name: str = "teacher"
    embed_dim: int
    stride: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: whether ``_resize`` can change the input size (CNNs, ViTs with resampled position embeddings)
    resizable: bool = True

    def _features(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _resize(self, input_size: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def grid_size(self) -> int:
        return self.input_size // self.stride

    @property
    def num_features(self) -> int:
        # torchmetrics' FID reads this instead of probing the network with a 299 px dummy image
        return self.embed_dim

    def describe(self) -> str:
        return f"{self.name} ({self.input_size}px input, {self.grid_size}x{self.grid_size} tokens, dim {self.embed_dim})"

    def freeze(self) -> "TeacherEncoder":
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "TeacherEncoder":
        return super().train(False)  # frozen teachers stay in eval mode (no dropout, BN running stats)

    def set_grid(self, grid: int) -> None:
        """Resize the teacher's input so its token grid is ``grid x grid``; raise if impossible."""
        if grid == self.grid_size:
            return
        if not self.resizable:
            raise GridMismatchError(
                f"teacher {self.name} has a fixed {self.grid_size}x{self.grid_size} token grid and cannot give "
                f"{grid}x{grid}. Change the student's token grid (patch size / image size / align.grid) or set "
                "teacher.interpolate_tokens: true to interpolate the teacher tokens instead.")
        self._resize(grid * self.stride)
        self.input_size = grid * self.stride
        got = self.check_grid()
        if got != grid:
            raise GridMismatchError(f"teacher {self.name} at {self.input_size}px gives a {got}x{got} grid, not {grid}x{grid}. "
                                    "Set teacher.interpolate_tokens: true or pick a student grid the teacher supports.")

    @torch.no_grad()
    def check_grid(self) -> int:
        """Grid side measured with a dummy forward (catches models whose stride metadata is wrong)."""
        p = next(self.parameters(), None)
        x = torch.zeros(1, 3, self.input_size, self.input_size, device=p.device if p is not None else "cpu")
        _, side = tokens_from_features(self._features(x), self.num_prefix_tokens)
        return side

    num_prefix_tokens: int = 0

    def forward_tokens(self, images: Tensor) -> Tensor:
        """``(B, 3, input_size, input_size)`` teacher-normalised images -> ``(B, grid**2, embed_dim)``."""
        tokens, _ = tokens_from_features(self._features(images), self.num_prefix_tokens)
        return tokens

    def prepare(self, images: Tensor, value_range: Sequence[float] = (-1.0, 1.0)) -> Tensor:
        """Images in ``value_range`` at any size -> the teacher's size and normalisation (float32)."""
        lo, hi = value_range
        x = (images.float() - lo) / (hi - lo)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                              antialias=x.shape[-1] > self.input_size).clamp(0, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, images: Tensor, value_range: Sequence[float] = (-1.0, 1.0), grid: int | None = None) -> Tensor:
        """Tokens of raw images; ``grid`` bilinearly interpolates the token grid to ``grid x grid``
        (the ``teacher.interpolate_tokens`` option of REPA) instead of resizing the input."""
        tokens = self.forward_tokens(self.prepare(images, value_range)).float()
        if grid is not None and grid != self.grid_size:
            b, n, d = tokens.shape
            side = math.isqrt(n)
            fmap = tokens.transpose(1, 2).reshape(b, d, side, side)
            fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
            tokens = fmap.flatten(2).transpose(1, 2)
        return tokens

    def forward(self, images: Tensor) -> Tensor:
        """Pooled ``(B, embed_dim)`` features of images in ``[0, 1]`` (the torchmetrics FID contract
        with ``normalize=True``): the mean over patch tokens."""
        with torch.no_grad():
            return self.forward_tokens(self.prepare(images, (0.0, 1.0))).float().mean(1)
