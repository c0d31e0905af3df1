"""Weather corruptions: snow, frost, fog (CIFAR-10-C tables).

Each function takes a uint8 HxWx3 image, a severity in 1..5 and a Generator, and returns float
values on the 0..255 scale.

Deviation (frost): the original blends crops of six frost *photographs* (frost1.png ... frost6.jpg,
shipped with the ImageNet-C code). We do not have them, so ``frost_texture`` synthesises a
deterministic procedural texture (plasma haze + ice needles with 60-degree side branches + grain,
slightly blue). The blending coefficients are the original ones, but the texture statistics are not
calibrated against the photographs: frost numbers are not comparable with published CIFAR-10-C.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter

from ._common import clipped_zoom, motion_blur, plasma_for, size_scale

# (noise mean, noise std, zoom, threshold, motion radius, motion sigma, image weight);
# zoom (flake size) and the motion-blur radius/sigma are scaled with image size.
SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
# (image weight, frost weight): out = a * image + b * frost, both on the 0..255 scale.
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
# (fog strength, plasma wibble decay): larger decay = smoother fog.
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))

# RGB tint of the synthetic frost (ice looks slightly blue-white in the photographs).
_FROST_TINT = np.array([0.88, 0.95, 1.0], dtype=np.float32)
_NEEDLES_PER_IMAGE = 40  # at any size: needle lengths scale with the image, so the count does not


def snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    s = size_scale(image)
    mean, std, zoom, thresh, radius, sigma, weight = SNOW[severity - 1]
    x = image.astype(np.float32) / 255.0
    layer = rng.normal(size=x.shape[:2], loc=mean, scale=std)
    # Zooming the noise sets the flake size in pixels: scale it so flakes keep their size
    # relative to the image (and their count per image) at 64 px.
    layer = clipped_zoom(layer[..., None], zoom * s)[..., 0]
    layer[layer < thresh] = 0
    # The original round-trips the layer through 8-bit PNG before and after ImageMagick.
    layer = np.uint8(np.clip(layer, 0, 1) * 255).astype(np.float32)
    layer = motion_blur(layer, radius * s, sigma * s, rng.uniform(-135, -45))
    layer = (np.clip(np.round(layer), 0, 255) / 255.0)[..., None]
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = weight * x + (1 - weight) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


def frost_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Procedural stand-in for a crop of a frost photograph: HxWx3 float32 on the 0..255 scale.

    Built from ``rng`` only, so it is deterministic per seed. Feature sizes are relative to the
    image (a 32 px CIFAR crop of the 0.2x-resized photographs shows a handful of crystals):
    - haze: a smooth plasma fractal (frosted glass is never uniform);
    - needles: straight anti-aliased segments of 10-45% of the image side with two to four side
      branches at +-60 degrees (hexagonal ice habit), drawn at 4x and area-downsampled so lines are
      thinner than a pixel at 32 px;
    - grain: smoothed white noise.
    Mean intensity is about 0.5 (128), an uncalibrated guess at the photographs' brightness.
    """
    side = min(h, w)
    haze = plasma_for(h, w, 2.0, rng).astype(np.float32)

    up = 4
    canvas = np.zeros((h * up, w * up), np.uint8)
    n_needles = max(1, int(round(_NEEDLES_PER_IMAGE * h * w / side**2)))
    frac = 1 << 4  # cv2 fixed-point sub-pixel bits
    for _ in range(n_needles):
        y0, x0 = rng.uniform(0, h * up), rng.uniform(0, w * up)
        length = rng.uniform(0.10, 0.45) * side * up
        theta = rng.uniform(0, math.pi)
        level = int(rng.uniform(0.45, 1.0) * 255)
        n_branch = int(rng.integers(2, 5))
        segs = [(y0, x0, theta, length)]
        for _ in range(n_branch):
            t = rng.uniform(0.15, 0.85)
            by, bx = y0 + t * length * math.sin(theta), x0 + t * length * math.cos(theta)
            btheta = theta + rng.choice([-1.0, 1.0]) * math.pi / 3
            segs.append((by, bx, btheta, rng.uniform(0.2, 0.45) * length))
        for sy, sx, st, sl in segs:
            p1 = (int(sx * frac), int(sy * frac))
            p2 = (int((sx + sl * math.cos(st)) * frac), int((sy + sl * math.sin(st)) * frac))
            cv2.line(canvas, p1, p2, level, thickness=up // 2, lineType=cv2.LINE_AA, shift=4)
    needles = cv2.resize(canvas.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_AREA)

    grain = gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 0.5 * side / 32)
    grain /= grain.std() + 1e-8

    frost = 0.30 + 0.35 * haze + 0.9 * needles + 0.05 * grain
    frost = np.clip(frost, 0, 1)[..., None] * _FROST_TINT
    return frost * 255


def frost(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    a, b = FROST[severity - 1]
    texture = frost_texture(image.shape[0], image.shape[1], rng)
    return np.clip(a * image.astype(np.float32) + b * texture, 0, 255)


def fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = FOG[severity - 1]
    x = image / 255.0
    max_val = x.max()
    x = x + strength * plasma_for(x.shape[0], x.shape[1], decay, rng)[..., None]
    # Renormalise so the brightest clean value maps back near its level (original formula).
    return np.clip(x * max_val / (max_val + strength), 0, 1) * 255
