"""Precomputed teacher features: written once, looked up by sample key during training.

Layout of a feature directory: ``meta.json`` (teacher description, grid, dim) and shards
``features-00000.pt`` ... each a dict ``{key: (2, G*G, D) float16}`` holding the tokens of the
image and of its horizontal flip, so the module's random flip picks the exact teacher features.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable

import torch
from torch import Tensor


def write_features(batches: Iterable[dict], teacher, out_dir: str, grid: int | None = None, shard_size: int = 5000,
                   interpolate: bool = False) -> dict:
    """Encode every ``batch["image"]`` (``[-1, 1]``) and its flip with ``teacher``; keys deduplicated.

    ``grid`` resizes the teacher input (or, with ``interpolate``, its tokens) to that token grid.
    """
    if grid is not None and not interpolate:
        teacher.set_grid(grid)
    os.makedirs(out_dir, exist_ok=True)
    shard: dict[str, Tensor] = {}
    seen: set[str] = set()
    n_shards = 0
    dim = side = None

    def flush() -> None:
        nonlocal shard, n_shards
        if shard:
            torch.save(shard, os.path.join(out_dir, f"features-{n_shards:05d}.pt"))
            n_shards, shard = n_shards + 1, {}

    device = next(teacher.parameters()).device
    for batch in batches:
        images = batch["image"].to(device)
        both = teacher.encode(torch.cat([images, images.flip(-1)]), grid=grid if interpolate else None)
        plain, flipped = both.chunk(2)
        dim, side = both.shape[-1], int(both.shape[1] ** 0.5)
        for i, key in enumerate(batch["key"]):
            if key in seen:
                continue
            seen.add(key)
            shard[key] = torch.stack([plain[i], flipped[i]]).half().cpu()
            if len(shard) >= shard_size:
                flush()
    flush()
    meta = {"teacher": teacher.describe(), "grid": side, "dim": dim, "num_samples": len(seen), "shards": n_shards}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


class FeatureStore:
    """All shards of a feature directory in memory; ``lookup(keys, flipped) -> (B, N, D)`` float32."""

    def __init__(self, directory: str) -> None:
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"teacher.features '{directory}' has no meta.json; write it with "
                                    "`mmalign precompute_teacher -c <config> --out_dir <dir>`.")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.features: dict[str, Tensor] = {}
        for path in sorted(glob.glob(os.path.join(directory, "features-*.pt"))):
            self.features.update(torch.load(path, map_location="cpu", weights_only=True))
        if not self.features:
            raise FileNotFoundError(f"teacher.features '{directory}' has no features-*.pt shards.")
        self.dim, self.grid = int(self.meta["dim"]), int(self.meta["grid"])
        self.description = f"precomputed[{self.meta['teacher']}] from {directory}"

    def check(self, grid: int) -> None:
        if grid != self.grid:
            raise ValueError(f"precomputed teacher features are on a {self.grid}x{self.grid} grid but the student aligns "
                             f"at {grid}x{grid}; recompute them for this backbone or set align.grid: {self.grid}.")

    def lookup(self, keys: list[str], flipped: Tensor) -> Tensor:
        missing = [k for k in keys if k not in self.features]
        if missing:
            raise KeyError(f"{len(missing)} sample key(s) have no precomputed teacher features (e.g. {missing[:3]}); "
                           "recompute the features for these training shards.")
        idx = flipped.long().cpu().tolist()
        return torch.stack([self.features[k][i] for k, i in zip(keys, idx)]).float()
