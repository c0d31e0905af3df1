"""Shard indexes cached beside the shards, so a run does not scan every tar's headers again.

One JSON per shard in ``<shard folder>/.mmalign-index/``, keyed by the shard's size and modification
time and by the members the index was asked to read: a rewritten or replaced shard, or a datamodule
asking for other members, is scanned again. Writing is best effort (a read-only data folder only means
the next run scans again) and atomic (a concurrent reader sees the old file or the whole new one).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence

CACHE_DIR = ".mmalign-index"
VERSION = 1


def _key(url: str, read_exts: Sequence[str], required: Sequence[Sequence[str]]) -> tuple[str, dict] | None:
    try:
        st = os.stat(url)
    except OSError:
        return None
    path = os.path.join(os.path.dirname(url), CACHE_DIR, os.path.basename(url) + ".json")
    return path, {"version": VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                  "read_exts": sorted(read_exts), "required": [sorted(g) for g in required]}


def load(url: str, read_exts: Sequence[str], required: Sequence[Sequence[str]]) -> dict | None:
    """The cached index fields of ``url``, or ``None`` when absent, stale or unreadable."""
    key = _key(url, read_exts, required)
    if key is None or not os.path.isfile(key[0]):
        return None
    try:
        with open(key[0]) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data.get("index") if data.get("key") == key[1] else None


def store(url: str, read_exts: Sequence[str], required: Sequence[Sequence[str]], index: dict) -> None:
    key = _key(url, read_exts, required)
    if key is None:
        return
    tmp = f"{key[0]}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(key[0]), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"key": key[1], "index": index}, f)
        os.replace(tmp, key[0])
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
