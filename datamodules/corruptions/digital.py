"""Digital corruptions: brightness, contrast, elastic_transform, pixelate, jpeg_compression.

Each function takes a uint8 HxWx3 image, a severity in 1..5 and a Generator, and returns values on
the 0..255 scale (float or uint8).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates

BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to HSV value, image in [0, 1]
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor on the deviation from the per-channel mean
# (displacement amplitude, displacement smoothing sigma, affine corner jitter) as fractions of the
# image side: the original writes them as IMSIZE * fraction with IMSIZE = 32, so using the actual
# side is its own scaling rule. Severity 1 has no elastic part, only the affine jitter.
ELASTIC_TRANSFORM = (
    (0.0, 0.0, 0.08),
    (0.05, 0.2, 0.07),
    (0.08, 0.06, 0.06),
    (0.1, 0.04, 0.05),
    (0.1, 0.03, 0.03),
)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # box-downsample to int(side * c), box-upsample back
JPEG_COMPRESSION = (80, 65, 58, 50, 40)  # PIL JPEG quality


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Raise the HSV value channel (skimage rgb2hsv/hsv2rgb in the original; cv2's float32 HSV
    is the same transform, hue in degrees)."""
    c = BRIGHTNESS[severity - 1]
    hsv = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1) * 255


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = CONTRAST[severity - 1]
    x = image / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def elastic_transform(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Random affine (three control points jittered) followed by a smooth random displacement
    field, as in make_cifar_c.py (skimage gaussian -> scipy gaussian_filter, same mode/truncate)."""
    h, w = image.shape[:2]
    side = min(h, w)
    alpha, sigma, jitter = (f * side for f in ELASTIC_TRANSFORM[severity - 1])
    x = image.astype(np.float32) / 255.0

    # (row, col) pairs used as (x, y) points by cv2, exactly as the original (moot for squares).
    center = np.float32((h, w)) // 2
    square = side // 3
    pts1 = np.float32(
        [center + square, [center[0] + square, center[1] - square], center - square]
    )
    pts2 = pts1 + rng.uniform(-jitter, jitter, size=pts1.shape).astype(np.float32)
    affine = cv2.getAffineTransform(pts1, pts2)
    x = cv2.warpAffine(x, affine, (w, h), borderMode=cv2.BORDER_REFLECT_101)

    dx = rng.uniform(-1, 1, size=(h, w))
    dy = rng.uniform(-1, 1, size=(h, w))
    if alpha > 0:
        dx = (gaussian_filter(dx, sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
        dy = (gaussian_filter(dy, sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    else:  # severity 1: alpha = sigma = 0, the field is exactly zero
        dx = dy = np.zeros((h, w), np.float32)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([rows + dy, cols + dx])
    out = np.stack(
        [map_coordinates(x[..., ch], coords, order=1, mode="reflect") for ch in range(x.shape[2])],
        axis=-1,
    )
    return np.clip(out, 0, 1) * 255


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = PIXELATE[severity - 1]
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    small = pil.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX))


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=JPEG_COMPRESSION[severity - 1])
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))
