"""Reading the members of one sample: which member is the image, its decoding, the json member.

Shared by every datamodule, the folder reader and the corruption writer, so an image extension or a
decoding rule is defined once.
"""

from __future__ import annotations

import io
import json

#: image members a sample may carry, in the order they are looked for
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")


def find_image(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    members = sorted(k for k in sample if not k.startswith("__"))
    raise KeyError(f"no image member ({'/'.join(IMAGE_EXTS)}); members: {members}")


def read_json(sample: dict) -> dict:
    """The ``.json`` member as a mapping ({} without one); a malformed one raises (the sample is skipped)."""
    if "json" not in sample:
        return {}
    meta = json.loads(sample["json"].decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f".json member is a {type(meta).__name__}, not an object")
    return meta


def decode_image_bytes(data: bytes):
    """PIL image in RGB, fully decoded now so a corrupt payload fails here and not in a transform.

    Upright as the camera meant it (EXIF orientation applied), whatever the mode: grayscale and 1-bit
    images are spread over the three channels, 16-bit images scaled (not clipped) to 8 bits, CMYK
    converted, and transparent pixels (alpha, or a palette's transparent colour) shown over white, as
    an image viewer shows them, instead of whatever colour the file stores under them."""
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    img.load()
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img):
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):  # 16-bit / 32-bit integer / float grayscale
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
