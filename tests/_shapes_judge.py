"""A deterministic judge for the shapes data, for tests: it really classifies real shapes images.

Colour: the median colour of the clearly-foreground pixels, nearest in the generator's palette.
Shape: the image's foreground (a soft mask: how far each pixel lies from the background colour toward
the shape's colour) is compared with masks of every shape drawn by the generator's own ``draw_shape``
at the measured centre and the area-matched radius, over the generator's rotation range; the best fit
wins. On large shapes at 64 px it classifies all 360 images of a seeded check correctly (small shapes:
about 1 in 500 circles reads as a hexagon).

``encode_images`` gives the one-hot class (colour x shape combination) and ``encode_texts`` the
one-hot class named in a text, so ``ClipJudge``'s interface, the zero-shot class weights and
``TextImageAlignment`` run unchanged on it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from datamodules.generate.shapes import COLORS, SHAPES, SUPERSAMPLE, draw_shape

PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
COLOUR_NAMES = list(COLORS)


def _mask(shape: str, size: int, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    big = size * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw_shape(ImageDraw.Draw(img), shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, 255, rot)
    return np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float64) / 255.0


_AREA: dict[tuple[str, int], float] = {}


def _area_per_r2(shape: str, size: int) -> float:
    if (shape, size) not in _AREA:
        r = size * 0.25
        _AREA[(shape, size)] = _mask(shape, size, size / 2, size / 2, r, 0.0).sum() / r ** 2
    return _AREA[(shape, size)]


def classify(img: np.ndarray) -> tuple[int, int]:
    """``(shape index, colour index)`` of an ``(H, W, 3)`` uint8 shapes image."""
    x = img.astype(np.float64)
    size = x.shape[0]
    bg = np.median(np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]]), 0)
    col = np.median(x[np.linalg.norm(x - bg, axis=-1) > 40], 0)
    colour = int(np.argmin(np.linalg.norm(PALETTE - col, axis=1)))
    soft = np.clip(((x - bg) @ (col - bg)) / max(float(np.linalg.norm(col - bg)) ** 2, 1.0), 0, 1)
    area = soft.sum()
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    cx, cy = (soft * xs).sum() / area, (soft * ys).sum() / area
    errors = []
    for shape in SHAPES:
        r = math.sqrt(area / _area_per_r2(shape, size))
        rotations = [0.0] if shape == "circle" else np.linspace(-0.3, 0.3, 13)
        errors.append(min(np.abs(_mask(shape, size, cx, cy, r, rot) - soft).sum() for rot in rotations))
    return int(np.argmin(errors)), colour


class ShapesJudge:
    """The judge interface (``encode_images``, ``encode_texts``) over one-hot colour x shape classes."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        out = torch.zeros(len(arr), len(SHAPES) * len(COLORS))
        for i, img in enumerate(arr):
            s, c = classify(img)
            out[i, s * len(COLORS) + c] = 1.0
        return out

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), len(SHAPES) * len(COLORS))
        for i, text in enumerate(texts):
            words = text.lower().replace(".", " ").split()
            s = [k for k, name in enumerate(SHAPES) if name in words]
            c = [k for k, name in enumerate(COLOUR_NAMES) if name in words]
            if len(s) == 1 and len(c) == 1:
                out[i, s[0] * len(COLORS) + c[0]] = 1.0
        return out
