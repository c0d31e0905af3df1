"""Image shifts outside the 15 benchmark corruptions, for ``bench_tta.py``: the mild "hidden shift" a user
brings (issue 26) and the validation shifts the TTA defaults are chosen on (never reported).

Three families, disjoint by construction:

- ``REPORT_MILD``: the reported mild shifts (a warm colour cast, a gamma curve, a slight tilt + blur);
- ``VAL_MILD``: other mild shifts for tuning (a cool cast, dimming, a small translation + sharpening);
- ``VAL_STRONG``: strong shifts for tuning (a heavy colour cast, solarisation, 3-bit posterisation + grain).

Each shift maps a uint8 (H, W, 3) image and a numpy Generator to a uint8 image; the generator makes the
per-image parameters vary around the shift's setting (the "draw", seeded per benchmark seed).
``write_shift_folders`` writes labelled image folders ``root/<shift>/<class>/<key>.png`` (what a user
hands ``adapt``), read in folder order: class-sorted batches, a label shift on top of the image shift.
"""

from __future__ import annotations

import io
import os
import zlib

import numpy as np
from PIL import Image, ImageFilter


def _colour(img, rng, gains):
    g = np.asarray(gains) * (1 + rng.uniform(-0.04, 0.04, 3))
    return np.clip(img.astype(np.float32) * g, 0, 255).astype(np.uint8)


def _gamma(img, rng, gamma):
    g = gamma * (1 + rng.uniform(-0.06, 0.06))
    return np.clip(255.0 * (img / 255.0) ** g, 0, 255).astype(np.uint8)


def _tilt(img, rng):
    pil = Image.fromarray(img).rotate(float(rng.uniform(-9, 9)), resample=Image.BILINEAR)
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=0.6)))


def _dim(img, rng):
    a = 0.78 * (1 + rng.uniform(-0.05, 0.05))
    return np.clip(img.astype(np.float32) * a + 10, 0, 255).astype(np.uint8)


def _translate_sharpen(img, rng):
    dx, dy = rng.integers(-2, 3, size=2)
    out = np.roll(np.roll(img, int(dx), axis=1), int(dy), axis=0)
    return np.asarray(Image.fromarray(out).filter(ImageFilter.SHARPEN))


def _solarize(img, rng):
    t = int(150 + rng.integers(-10, 11))
    return np.where(img >= t, 255 - img, img).astype(np.uint8)


def _posterize_grain(img, rng):
    q = (img >> 5) << 5
    return np.clip(q.astype(np.float32) + rng.normal(0, 18, img.shape), 0, 255).astype(np.uint8)


SHIFTS = {
    "warm": lambda im, r: _colour(im, r, (1.2, 1.0, 0.75)),
    "gamma": lambda im, r: _gamma(im, r, 1.5),
    "tilt": _tilt,
    "cool": lambda im, r: _colour(im, r, (0.8, 0.95, 1.2)),
    "dim": _dim,
    "translate": _translate_sharpen,
    "cast": lambda im, r: _colour(im, r, (1.8, 1.1, 0.3)),
    "solarize": _solarize,
    "posterize": _posterize_grain,
}
REPORT_MILD = ("warm", "gamma", "tilt")
VAL_MILD = ("cool", "dim", "translate")
VAL_STRONG = ("cast", "solarize", "posterize")


def write_shift_folders(src_shards: str, root: str, shifts, seed: int) -> dict[str, str]:
    """``root/<shift>/<class>/<key>.png`` for every shift (skipped when already complete); returns
    ``{shift: folder}``. The draw depends on ``seed``, the shift and the sample's position only."""
    from datamodules.shards import expand_shards, iter_tar_samples

    samples = []
    errors: list[str] = []
    for url in expand_shards(src_shards, "test shards"):
        for s in iter_tar_samples(url, errors):
            samples.append((s["__key__"], int(s["cls"].decode().strip()), s["png"]))
    if errors:
        raise RuntimeError(f"unreadable test shards: {errors[:3]}")
    out = {}
    for name in shifts:
        folder = os.path.join(root, name)
        out[name] = folder
        done = os.path.join(folder, ".complete")
        if os.path.isfile(done):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 26])
        for key, label, data in samples:
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            cls_dir = os.path.join(folder, str(label))
            os.makedirs(cls_dir, exist_ok=True)
            Image.fromarray(SHIFTS[name](img, rng)).save(os.path.join(cls_dir, f"{key}.png"))
        open(done, "w").close()
    return out
