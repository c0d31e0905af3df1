"""CIFAR-10-C image corruptions (Hendrycks & Dietterich, ICLR 2019) in numpy/scipy/PIL/OpenCV.

``corrupt(image, name, severity, seed)`` applies one of the 15 benchmark corruptions at severity
1..5 using the CIFAR-10-C parameter tables of ``make_cifar_c.py`` (the tables live as constants
in ``noise``, ``blur``, ``weather`` and ``digital``).

Image size. The tables are written for 32 px CIFAR images. Parameters measured in pixels
(blur radii and sigmas, glass-blur displacement, snow flake size and streak length) are multiplied
by ``min(H, W) / 32`` so a 64 px image is corrupted like a 32 px one seen at twice the resolution.
Relative parameters need no change: noise levels, zoom factors, pixelation (already a fraction
of the side), elastic transform (written as fractions of the side), fog (plasma map sized to the
image), brightness/contrast and JPEG quality (JPEG's 8 px blocks are intrinsic to the codec).
At 32 px every corruption uses the original numbers unchanged.

Deviations from the original (see each module for details):
- ImageMagick motion blur (motion_blur, snow) is a one-sided Gaussian line kernel applied with
  ``cv2.filter2D``, following ImageMagick's integer-offset construction.
- skimage calls are replaced by scipy.ndimage / cv2 equivalents with the same modes.
- frost uses a synthetic procedural texture instead of the six frost photographs.
- The original truncates the float result with ``np.uint8``; we round to nearest, which avoids a
  systematic -0.5 grey-level bias (e.g. clean pixels at 254.9999 becoming 254).

Determinism: each call builds ``np.random.default_rng(seed)`` and draws only from it, so identical
(image, name, severity, seed) give identical bytes, independent of global RNG state.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import blur, digital, noise, weather

CorruptionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

# Benchmark order (fixed): the continual TTA stream visits the domains in exactly this order.
_REGISTRY: dict[str, CorruptionFn] = {
    "gaussian_noise": noise.gaussian_noise,
    "shot_noise": noise.shot_noise,
    "impulse_noise": noise.impulse_noise,
    "defocus_blur": blur.defocus_blur,
    "glass_blur": blur.glass_blur,
    "motion_blur": blur.motion_blur,
    "zoom_blur": blur.zoom_blur,
    "snow": weather.snow,
    "frost": weather.frost,
    "fog": weather.fog,
    "brightness": digital.brightness,
    "contrast": digital.contrast,
    "elastic_transform": digital.elastic_transform,
    "pixelate": digital.pixelate,
    "jpeg_compression": digital.jpeg_compression,
}

CORRUPTIONS: tuple[str, ...] = tuple(_REGISTRY)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
# Corruptions whose output depends on the seed (the others are deterministic functions of the
# image: brightness, contrast, pixelate, jpeg_compression, defocus_blur, zoom_blur).
STOCHASTIC: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur",
    "snow", "frost", "fog", "elastic_transform",
)

# Smallest side accepted: below this the 3x3 control points of elastic_transform collapse and
# pixelate/plasma degenerate. CIFAR (32 px) is well above it.
MIN_SIDE = 8


def check_name_severity(name: str, severity: int) -> None:
    """Raise ValueError for an unknown corruption name or a severity outside 1..5."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not (
        1 <= severity <= 5
    ):
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be HxW or HxWx3 (or HxWx1), got shape {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image sides must be >= {MIN_SIDE} px, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1..5) to a uint8 image.

    ``image``: HxWx3 uint8 RGB. A grayscale HxW (or HxWx1) image is broadcast to 3 identical
    channels first, so the result is always HxWx3 uint8 (colour corruptions such as frost and
    snow make the channels differ). Square images are the tested case; rectangular ones work and
    scale pixel-sized parameters by the shorter side. ``seed`` seeds a local
    ``np.random.default_rng``; the input array is never modified.
    """
    check_name_severity(name, severity)
    rgb = _as_rgb(image)
    rng = np.random.default_rng(seed)
    out = _REGISTRY[name](rgb, int(severity), rng)
    out = np.asarray(out)
    if out.dtype != np.uint8:
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


__all__ = ["CORRUPTIONS", "SEVERITIES", "STOCHASTIC", "check_name_severity", "corrupt"]
