"""Tiny shards written by the tests themselves."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def png_bytes(value: int, size: int = 8) -> bytes:
    arr = np.full((size, size, 3), value % 256, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(directory: str, counts: list[int], corrupt: set[str] = frozenset(), label_of=None,
                 with_image: bool = True, prefix: str = "s") -> list[str]:
    """Shards ``{prefix}-XXXX.tar`` with image-text-label samples; keys are globally unique."""
    from datamodules.shards import write_shard

    os.makedirs(directory, exist_ok=True)
    paths, n = [], 0
    for i, count in enumerate(counts):
        samples = []
        for _ in range(count):
            key = f"k{n:05d}"
            sample = {"__key__": key, "txt": f"caption {n}", "cls": str(label_of(n) if label_of else n % 3),
                      "json": {"n": n, "label": n % 3}}
            if with_image:
                sample["png"] = b"not a png at all" if key in corrupt else png_bytes(n)
            samples.append(sample)
            n += 1
        paths.append(os.path.join(directory, f"{prefix}-{i:04d}.tar"))
        write_shard(paths[-1], samples)
    return paths
