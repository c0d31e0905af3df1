"""``digits``: scikit-learn's bundled 8x8 handwritten digits, upscaled, captioned and split.

1797 images; a stratified, seeded split into train (70%), val (10%) and test (20%). Images are
white-on-black, bicubically upscaled to ``image_size`` and stored as RGB PNG; ``.cls`` is the digit.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from . import encode_image, write_class_spec, write_split

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = ("a photo of the digit {w}", "the number {d}", "a handwritten {w}", "a {w}",
            "a blurry handwritten digit {d}", "the digit {w}, written by hand")
PROMPT_TEMPLATES = ["a photo of the digit {}.", "a handwritten {}.", "the number {}.", "a {}."]


def _split_indices(labels: np.ndarray, seed: int) -> dict[str, list[int]]:
    rng = random.Random(f"digits-split-{seed}")
    out = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = [int(i) for i in np.flatnonzero(labels == c)]
        rng.shuffle(idx)
        n_val, n_test = round(0.1 * len(idx)), round(0.2 * len(idx))
        out["val"] += idx[:n_val]
        out["test"] += idx[n_val:n_val + n_test]
        out["train"] += idx[n_val + n_test:]
    for v in out.values():
        rng.shuffle(v)
    return out


def _samples(split: str, idx: list[int], images: np.ndarray, labels: np.ndarray, image_size: int, seed: int):
    rng = random.Random(f"digits-{split}-{seed}")
    for n, i in enumerate(idx):
        arr = (images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB")
        d = int(labels[i])
        text = rng.choice(CAPTIONS).format(w=WORDS[d], d=d)
        yield {"__key__": f"{split}-{n:06d}", "png": encode_image(img, "png"), "txt": text, "cls": str(d),
               "json": {"label": d, "word": WORDS[d], "source_index": i, "caption": text}}


def generate(root: str, seed: int = 0, image_size: int = 32, shard_size: int = 200) -> dict:
    from sklearn.datasets import load_digits

    data = load_digits()
    splits = _split_indices(data.target, seed)
    counts = {s: write_split(f"{root}/{s}", _samples(s, idx, data.images, data.target, image_size, seed), shard_size)
              for s, idx in splits.items()}
    write_class_spec(root, "classes.json", list(WORDS), PROMPT_TEMPLATES)
    return {"splits": counts, "seed": seed, "image_size": image_size, "num_classes": 10}
