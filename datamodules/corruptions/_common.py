"""Helpers shared by several corruptions: size scaling, clipped zoom, motion-blur kernel, plasma.

All of them take float images in [0, 1] (HxWxC) unless said otherwise and draw randomness only
from the ``np.random.Generator`` they are handed, never from global RNG state.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy.ndimage import zoom as _scizoom

# The CIFAR-10-C tables were written for 32 px images; pixel-sized parameters are multiplied by
# ``size_scale`` so a 64 px image gets the same corruption *relative to its size*.
REFERENCE_SIZE = 32


def size_scale(x: np.ndarray) -> float:
    """How much larger than a 32 px CIFAR image ``x`` is (shorter side; 1.0 for 32x32)."""
    return min(x.shape[0], x.shape[1]) / REFERENCE_SIZE


def clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    """Zoom into the centre of ``img`` (HxWxC) by ``zoom_factor`` and crop back to HxW.

    Same as ``clipped_zoom`` of make_cifar_c.py (crop ceil(h/z), bilinear scipy zoom, centre trim),
    written per axis so non-square images work too.
    """
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / zoom_factor)), int(np.ceil(w / zoom_factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = img[top : top + ch, left : left + cw]
    factors = (zoom_factor, zoom_factor) + (1,) * (img.ndim - 2)
    out = _scizoom(crop, factors, order=1)
    trim_top, trim_left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[trim_top : trim_top + h, trim_left : trim_left + w]


def motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's ``-motion-blur radius x sigma + angle`` as one cv2 line-kernel convolution.

    ImageMagick (used through ``wand`` in the original) averages ``2*radius+1`` copies of the image
    shifted by integer steps along ``angle`` (degrees), weighted by a one-sided Gaussian
    ``exp(-i^2 / 2 sigma^2)``, i = 0..2r, edges replicated. We place those weights at the same
    integer offsets in a 2-D kernel (rounding as in the bethgelab ``imagecorruptions`` port) and let
    ``cv2.filter2D`` do the sum; the streak trails on one side only, as in ImageMagick.
    ``x``: HxW or HxWxC float32.
    """
    width = 2 * int(round(radius)) + 1
    weights = np.exp(-(np.arange(width, dtype=np.float64) ** 2) / (2.0 * sigma**2))
    weights /= weights.sum()
    dir_y, dir_x = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    kernel = np.zeros((2 * width - 1, 2 * width - 1), np.float32)
    c = width - 1
    for i, wgt in enumerate(weights):
        # shifted image s(y, x) = x(y - dy, x - dx): a correlation weight at offset (-dy, -dx)
        dy = -math.ceil(i * dir_y - 0.5)
        dx = -math.ceil(i * dir_x - 0.5)
        kernel[c - dy, c - dx] += wgt
    return cv2.filter2D(np.ascontiguousarray(x, dtype=np.float32), -1, kernel,
                        borderType=cv2.BORDER_REPLICATE)


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square plasma fractal of make_cifar_c.py, ``mapsize`` x ``mapsize`` in [0, 1].

    ``mapsize`` must be a power of two; the map is periodic (np.roll wraps). The original's
    ``wibble * uniform(-wibble, wibble)`` (amplitude wibble**2) is kept on purpose.
    """
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"plasma_fractal mapsize must be a power of two >= 2, got {mapsize}")
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: centre of each square = mean of its 4 corners + wibble
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = corners + np.roll(corners, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        # diamonds: edge midpoints = mean of 2 corners and 2 square centres + wibble
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay

    maparray -= maparray.min()
    return maparray / maparray.max()


def plasma_for(h: int, w: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """A plasma map covering an HxW image the way the 32 px map covers a CIFAR image.

    The original draws a 32x32 map for 32x32 images, so its largest blob spans the whole image.
    We draw the next power of two >= max(h, w) and resize to HxW (a no-op for 32 and 64 px), which
    keeps that relation for sizes such as 48 px instead of cropping a 64 px map.
    """
    side = max(h, w)
    mapsize = 1 << max(1, math.ceil(math.log2(side)))
    plasma = plasma_fractal(mapsize, wibbledecay, rng)
    if plasma.shape != (h, w):
        plasma = cv2.resize(plasma, (w, h), interpolation=cv2.INTER_AREA)
    return plasma
