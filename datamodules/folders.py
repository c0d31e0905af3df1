"""Image folders as shards: read a plain directory of images with the same stream as tar shards.

Two layouts, as torchvision's ``ImageFolder`` and a camera dump have them:

- labelled: ``root/<class>/<...>/image.jpg``; classes are the sub-folder names, sorted, and the
  class index of an image is its folder's position (``.cls`` member), names in ``classes``;
- unlabelled: images directly in ``root`` (or below it without class folders): no ``.cls``.

A folder is cut into *virtual shards* of up to 1000 images (at least 64 shards when there are that
many images), named
``folder://<root>#<start>-<end>``, so ranks and workers split it exactly as they split tar shards,
the sample counts are known without an index, and exact resume works unchanged. A sample's key is
its path relative to the root without the extension; its members are the image bytes under the
file's extension, ``cls`` for a labelled folder and ``json`` with the relative path and class name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from .errors import ShardError
from .samples import IMAGE_EXTS

FOLDER_SCHEME = "folder://"
FILES_PER_SHARD = 1000


@dataclass(frozen=True)
class FolderListing:
    root: str
    classes: tuple[str, ...]  # empty for an unlabelled folder
    files: tuple[tuple[str, int], ...]  # (path relative to root, class index or -1)

    def key(self, i: int) -> str:
        """Sample key of file ``i``: its path without the extension, unless another file shares that
        (``img0.png`` + ``img0.jpg``): then the extension stays, as ``img0_png``, so keys stay unique."""
        rel = self.files[i][0]
        stem = rel.rpartition(".")[0]
        return stem if stem not in self._shared_stems else f"{stem}_{_ext(rel)}"

    @property
    def _shared_stems(self) -> frozenset:
        cached = self.__dict__.get("_stems")
        if cached is None:
            from collections import Counter

            counts = Counter(rel.rpartition(".")[0] for rel, _ in self.files)
            cached = frozenset(k for k, n in counts.items() if n > 1)
            object.__setattr__(self, "_stems", cached)
        return cached


def _ext(name: str) -> str:
    return name.rpartition(".")[2].lower()


def is_image_folder(path: str) -> bool:
    """A directory holding images (directly or in sub-folders) and no tar shards."""
    if not os.path.isdir(path):
        return False
    for _, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(f.endswith(".tar") for f in files):
            return False
        if any(_is_image(f) for f in files):
            return True
    return False


def _is_image(name: str) -> bool:
    return not name.startswith(".") and _ext(name) in IMAGE_EXTS  # ._x.jpg: macOS metadata, not an image


def _images(top: str, root: str) -> list[str]:
    """Image files below ``top`` (relative to ``root``), sorted, skipping hidden files and folders
    (``.ipynb_checkpoints``, ``.git``) and following symlinked folders once (no loops)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames) if _is_image(f)]
    return found


@lru_cache(maxsize=32)
def scan(root: str) -> FolderListing:
    """List the images of ``root`` (cached per process: a 1M-image scan is done once).

    Every visible sub-folder of a labelled root is a class, also an empty one (so a split that lacks a
    class's images keeps the other classes' indices)."""
    root = os.path.abspath(root)
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if subdirs and not loose:  # ImageFolder: one folder per class
        files = [(rel, idx) for idx, name in enumerate(subdirs) for rel in _images(os.path.join(root, name), root)]
        listing = FolderListing(root, tuple(subdirs), tuple(files))
    else:
        listing = FolderListing(root, (), tuple((rel, -1) for rel in _images(root, root)))
    if not listing.files:
        raise ShardError(f"image folder '{root}' holds no images ({'/'.join(IMAGE_EXTS)}).")
    return listing


def folder_shards(root: str, files_per_shard: int | None = None) -> list[str]:
    """The virtual shard URLs of an image folder: at most ``FILES_PER_SHARD`` images each, and at
    least 64 shards when there are that many images (so 2+ ranks x workers can share a small folder)."""
    n = len(scan(root).files)
    files_per_shard = files_per_shard or min(FILES_PER_SHARD, max(1, -(-n // 64)))
    root = os.path.abspath(root)
    return [f"{FOLDER_SCHEME}{root}#{s}-{min(n, s + files_per_shard)}" for s in range(0, n, files_per_shard)]


def parse_url(url: str) -> tuple[str, int, int]:
    root, _, span = url[len(FOLDER_SCHEME):].rpartition("#")
    start, _, end = span.partition("-")
    return root, int(start), int(end)


def folder_size(url: str) -> int:
    _, start, end = parse_url(url)
    return end - start


def iter_folder_samples(url: str, errors: list[str], start: int = 0) -> Iterator[dict]:
    """Samples of one virtual shard, from position ``start`` on, then the ones before it (the same
    rotation as ``iter_tar_samples``). An unreadable file is reported in ``errors`` and skipped."""
    root, lo, hi = parse_url(url)
    listing = scan(root)
    order = list(range(lo + start, hi)) + list(range(lo, lo + start))
    for i in order:
        rel, cls = listing.files[i]
        try:
            with open(os.path.join(root, rel), "rb") as f:
                data = f.read()
        except OSError as exc:
            errors.append(f"{url}: cannot read {rel} ({exc})")
            continue
        sample = {"__key__": listing.key(i), "__url__": url, _ext(rel): data,
                  "json": json.dumps({"path": rel, **({"class": listing.classes[cls]} if cls >= 0 else {})}).encode()}
        if cls >= 0:
            sample["cls"] = str(cls).encode()
        yield sample


def folder_index_members(url: str) -> tuple[int, dict[str, int], bool]:
    """(samples, members per extension, labelled) of a virtual shard, without reading images."""
    root, lo, hi = parse_url(url)
    listing = scan(root)
    counts: dict[str, int] = {"json": hi - lo}
    for rel, _ in listing.files[lo:hi]:
        counts[_ext(rel)] = counts.get(_ext(rel), 0) + 1
    if listing.classes:
        counts["cls"] = hi - lo
    return hi - lo, counts, bool(listing.classes)


def class_names(url: str) -> list[str]:
    return list(scan(parse_url(url)[0]).classes)
