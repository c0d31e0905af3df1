"""Standard test-time-adaptation benchmark files, read as they are published (no conversion).

- **CIFAR-10-C / CIFAR-100-C** (Hendrycks & Dietterich 2019): a folder of ``<corruption>.npy`` arrays,
  uint8 ``(5 N, H, W, 3)`` (or ``(5 N, H, W)`` grey), severities 1..5 in consecutive blocks of ``N``
  images (``N = 10000`` in the published files; here taken from the file's length), and ``labels.npy``
  holding the ``5 N`` labels of those rows (or the ``N`` labels of one block). A domain is one block:
  ``npy://<folder>/<corruption>.npy#<severity>``, read through the same sample interface as a tar
  shard (members ``ppm``: the raw pixels behind a PPM header, decoded like any image, and ``cls``).
- **ImageNet-C**: ``<corruption>/<severity>/<wnid>/*.JPEG``; each ``<corruption>/<severity>`` folder is an
  image folder (``datamodules.folders``) whose class folders are the wnids (classes = the sorted wnids,
  or a class-index file given as ``label.classes``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache

from .errors import ShardError

NPY_SCHEME = "npy://"
SEVERITIES = (1, 2, 3, 4, 5)


def cifar_c_url(directory: str, corruption: str, severity: int) -> str:
    return f"{NPY_SCHEME}{os.path.abspath(os.path.join(directory, corruption + '.npy'))}#{int(severity)}"


def _parse(url: str) -> tuple[str, int]:
    path, _, severity = url[len(NPY_SCHEME):].rpartition("#")
    return path, int(severity)


@lru_cache(maxsize=64)
def _block(path: str) -> tuple[int, tuple[int, ...]]:
    """(images per severity block, image shape) of one corruption file, checked."""
    import numpy as np

    try:
        data = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ShardError(f"'{path}' is not a readable .npy array ({exc}).") from None
    if data.dtype != np.uint8 or data.ndim not in (3, 4) or (data.ndim == 4 and data.shape[-1] != 3):
        raise ShardError(f"'{path}' holds {data.dtype} {tuple(data.shape)}; a CIFAR-C file holds uint8 "
                         "(5 N, H, W, 3) images (severities 1..5 in blocks of N).")
    if data.shape[0] == 0 or data.shape[0] % len(SEVERITIES):
        raise ShardError(f"'{path}' holds {data.shape[0]} images, not 5 blocks of N (one per severity 1..5).")
    return data.shape[0] // len(SEVERITIES), tuple(data.shape[1:])


@lru_cache(maxsize=8)
def _labels(directory: str) -> tuple[int, ...]:
    import numpy as np

    path = os.path.join(directory, "labels.npy")
    try:
        labels = np.load(path)
    except (OSError, ValueError) as exc:
        raise ShardError(f"CIFAR-C folder '{directory}' has no readable labels.npy ({exc}).") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise ShardError(f"'{path}' holds {labels.dtype} {tuple(labels.shape)}; expected one class index >= 0 per "
                         "image.")
    return tuple(int(v) for v in labels)


def block_labels(path: str, severity: int) -> tuple[int, ...]:
    """The labels of one severity block: ``labels.npy`` holds all 5 N rows, or the N of one block."""
    n, _ = _block(path)
    labels = _labels(os.path.dirname(path))
    if len(labels) == n * len(SEVERITIES):
        return labels[(severity - 1) * n: severity * n]
    if len(labels) == n:
        return labels
    raise ShardError(f"'{os.path.join(os.path.dirname(path), 'labels.npy')}' holds {len(labels)} labels; "
                     f"'{os.path.basename(path)}' holds 5 blocks of {n} images, so it needs {5 * n} (or {n}).")


def check_cifar_c(directory: str, corruptions: list[str], severities: list[int]) -> None:
    """Every asked-for corruption file exists and fits ``labels.npy``: one line naming what does not."""
    if not os.path.isdir(directory):
        raise ShardError(f"benchmark.dir '{directory}' does not exist (layout cifar_c: a folder of <corruption>.npy "
                         "files and labels.npy).")
    have = sorted(f[:-4] for f in os.listdir(directory) if f.endswith(".npy") and f != "labels.npy")
    missing = [c for c in corruptions if c not in have]
    if missing:
        raise ShardError(f"benchmark.dir '{directory}' has no {', '.join(m + '.npy' for m in missing[:3])} "
                         f"(it holds: {have[:20]}). Fix benchmark.corruptions or the folder.")
    for c in corruptions:
        for s in severities:
            if s not in SEVERITIES:
                raise ShardError(f"benchmark.severities: {s} is not one of {list(SEVERITIES)}.")
            block_labels(os.path.join(directory, c + ".npy"), s)


def npy_size(url: str) -> int:
    return _block(_parse(url)[0])[0]


def iter_npy_samples(url: str, errors: list[str], start: int = 0) -> Iterator[dict]:
    """The samples of one severity block, from position ``start`` on, then the ones before it."""
    import numpy as np

    path, severity = _parse(url)
    n, shape = _block(path)
    labels = block_labels(path, severity)
    data = np.load(path, mmap_mode="r")
    corruption = os.path.basename(path)[:-4]
    header = f"P{6 if len(shape) == 3 else 5}\n{shape[1]} {shape[0]}\n255\n".encode()
    for i in list(range(start, n)) + list(range(start)):
        pixels = np.ascontiguousarray(data[(severity - 1) * n + i]).tobytes()
        yield {"__key__": f"{corruption}/{severity}/{i:05d}", "__url__": url, "ppm": header + pixels,
               "cls": str(labels[i]).encode()}
