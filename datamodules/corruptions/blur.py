"""Blur corruptions: defocus_blur, glass_blur, motion_blur, zoom_blur (CIFAR-10-C tables).

Each function takes a uint8 HxWx3 image, a severity in 1..5 and a Generator, and returns float
values on the 0..255 scale. Radii and sigmas in the tables are in pixels of a 32 px image and are
multiplied by ``size_scale`` (1.0 at 32 px, 2.0 at 64 px); zoom factors are already relative.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter

from ._common import clipped_zoom, motion_blur as _motion_blur_kernel, size_scale

# (disk radius, anti-alias Gaussian sigma), pixels at 32 px.
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))
# (Gaussian sigma, max pixel displacement, iterations), pixels at 32 px.
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
# ImageMagick motion blur (radius, sigma), pixels at 32 px; angle ~ U(-45, 45) degrees.
MOTION_BLUR = ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3))
# Zoom factors averaged with the clean image. np.arange with a float step as in the original:
# the float end point makes severity 1 include 1.06 (7 factors), severities 3-5 stop at 1.15/1.20/1.25.
ZOOM_BLUR = (
    np.arange(1, 1.06, 0.01),
    np.arange(1, 1.11, 0.01),
    np.arange(1, 1.16, 0.01),
    np.arange(1, 1.21, 0.01),
    np.arange(1, 1.26, 0.01),
)


def _disk(radius: float, alias_blur: float, scale: float) -> np.ndarray:
    """Normalised aliased disk, smoothed by a small Gaussian (``disk`` of make_cifar_c.py).

    The original uses a 17x17 support for radius <= 8 and a 3x3 smoothing window; the window grows
    with ``scale`` (3 at 32 px, 5 at 64 px) so the scaled sigma is not truncated.
    """
    if radius <= 8:
        grid = np.arange(-8, 8 + 1)
        k = 2 * max(1, int(round(scale))) + 1
    else:
        grid = np.arange(-radius, radius + 1)
        k = 2 * max(2, int(round(2 * scale))) + 1
    xx, yy = np.meshgrid(grid, grid)
    aliased = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    aliased /= aliased.sum()
    return cv2.GaussianBlur(aliased, ksize=(k, k), sigmaX=alias_blur)


def defocus_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    s = size_scale(image)
    radius, alias_blur = DEFOCUS_BLUR[severity - 1]
    kernel = _disk(radius * s, alias_blur * s, s)
    x = (image / 255.0).astype(np.float32)
    # cv2.filter2D default border (reflect-101), as in the original, applied to all channels.
    return np.clip(cv2.filter2D(x, -1, kernel), 0, 1) * 255


def _skimage_gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian(x, sigma, multichannel=True) defaults: spatial axes only,
    mode='nearest', truncate=4."""
    return gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


def glass_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, locally scramble pixels, blur again.

    Faithful to what the original code *does*: its ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on
    numpy views is not a swap but a copy of pixel (h', w') into (h, w), and ``randint(-d, d)``
    excludes +d, so displacements lie in [-d, d-1]. Both quirks are kept so severities match.
    """
    s = size_scale(image)
    sigma, delta, iterations = GLASS_BLUR[severity - 1]
    sigma *= s
    delta = max(1, int(round(delta * s)))
    h, w = image.shape[:2]
    x = np.uint8(_skimage_gaussian(image / 255.0, sigma) * 255)
    rows = range(h - delta, delta, -1)
    cols = range(w - delta, delta, -1)
    shifts = rng.integers(-delta, delta, size=(iterations, len(rows), len(cols), 2)).tolist()
    # Sequential on purpose: later copies read pixels that earlier ones already overwrote.
    for it in range(iterations):
        for r, row_shifts in zip(rows, shifts[it]):
            for c, (dx, dy) in zip(cols, row_shifts):
                x[r, c] = x[r + dy, c + dx]
    return np.clip(_skimage_gaussian(x / 255.0, sigma), 0, 1) * 255


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    s = size_scale(image)
    radius, sigma = MOTION_BLUR[severity - 1]
    angle = rng.uniform(-45, 45)
    x = image.astype(np.float32)
    return np.clip(_motion_blur_kernel(x, radius * s, sigma * s, angle), 0, 255)


def zoom_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factors = ZOOM_BLUR[severity - 1]
    x = (image / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for z in factors:
        out += clipped_zoom(x, z)
    x = (x + out) / (len(factors) + 1)
    return np.clip(x, 0, 1) * 255
