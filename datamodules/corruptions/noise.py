"""Noise corruptions: gaussian_noise, shot_noise, impulse_noise (CIFAR-10-C tables).

Per-pixel and per-channel, so nothing depends on image size. Each function takes a uint8 HxWx3
image, a severity in 1..5 and a Generator, and returns float values on the 0..255 scale.
"""

from __future__ import annotations

import numpy as np

# make_cifar_c.py tables (CIFAR-10-C values, not the ImageNet-C ones).
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # std of additive noise, image in [0, 1]
SHOT_NOISE = (500, 250, 100, 75, 50)  # photons per unit intensity: Poisson(x * c) / c
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values set to 0 or 1


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = GAUSSIAN_NOISE[severity - 1]
    x = image / 255.0
    return np.clip(x + rng.normal(scale=c, size=x.shape), 0, 1) * 255


def shot_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SHOT_NOISE[severity - 1]
    x = image / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper as skimage ``random_noise(mode='s&p', amount=c)``: each channel value is hit
    with probability c, then set to 1 or 0 with equal odds."""
    c = IMPULSE_NOISE[severity - 1]
    x = image / 255.0
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    x = np.where(hit & salt, 1.0, x)
    x = np.where(hit & ~salt, 0.0, x)
    return x * 255
