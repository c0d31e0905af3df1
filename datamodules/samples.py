"""Reading the members of one sample: which member is the image, its decoding, the json member.

Shared by every datamodule, the folder reader and the corruption writer, so an image extension or a
decoding rule is defined once.
"""

from __future__ import annotations

import io
import json

#: image members a sample may carry, in the order they are looked for
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def find_image(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    members = sorted(k for k in sample if not k.startswith("__"))
    raise KeyError(f"no image member ({'/'.join(IMAGE_EXTS)}); members: {members}")


def read_json(sample: dict) -> dict:
    return json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}


def decode_image_bytes(data: bytes):
    """PIL image in RGB, fully decoded now so a corrupt payload fails here and not in a transform."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")
