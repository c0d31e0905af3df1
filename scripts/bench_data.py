"""Throughput of the image-text datamodule against a plain PIL decoding loop over the same shards.

    python scripts/bench_data.py --root data/shapes --out bench_data.json

Both sides decode the same JPEG/PNG bytes and apply the same transform (resize/crop/to-tensor/
normalise); the datamodule adds tar streaming, shuffling, batching and worker processes. The
ratio ``datamodule / plain`` says what the streaming machinery costs (0 workers) or gains (>0).

Each of ``--repeats`` rounds times every reader once, in turn, so load on the machine hits all rows
alike; the table gives the mean ± 95% interval over the rounds (``benchstats``) of samples/s and of
the per-round ratio, and whether each reader differs significantly from the plain loop (paired by
round: the readers of a round share its load).
"""

from __future__ import annotations

import argparse
import os
import platform
import tarfile
import time

import torch
from benchstats import cell, compare, interval, save


def plain_loop(urls: list[str], transform, limit: int) -> tuple[int, float]:
    from datamodules.samples import decode_image_bytes

    n, t0 = 0, time.perf_counter()
    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf:
                if m.name.endswith((".jpg", ".png", ".webp")):
                    transform(decode_image_bytes(tf.extractfile(m).read()))
                    n += 1
                    if n >= limit:
                        return n, time.perf_counter() - t0
    return n, time.perf_counter() - t0


def datamodule_epoch(root: str, workers: int, batch: int, limit: int) -> tuple[int, float]:
    from datamodules import ImageTextDataModule

    dm = ImageTextDataModule(shards={"train": os.path.join(root, "train"), "samples_per_epoch": limit},
                             stream={"batch_size": batch, "num_workers": workers, "shuffle_buffer": 256},
                             image={"size": 64})
    dm.setup("fit")
    loader = dm.train_dataloader()
    n, t0 = 0, time.perf_counter()
    for b in loader:
        n += len(b["image"])
    return n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="data/shapes", help="shapes dataset root (generated if missing)")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=5, help="timing rounds, fixed before running (>= 3 for an interval)")
    p.add_argument("--out", default="outputs/bench/data.json")
    a = p.parse_args()
    torch.set_num_threads(1)  # decoding is per-process; keep the plain loop on one core like a worker

    from datamodules.generate import generate_dataset
    from datamodules.shards import expand_shards
    from datamodules.transforms import default_image_transform

    generate_dataset("shapes", a.root)
    urls = expand_shards(os.path.join(a.root, "train"))
    transform = default_image_transform(64, train=True)
    timings = {"plain": []} | {w: [] for w in a.workers}
    for _ in range(a.repeats):
        n, sec = plain_loop(urls, transform, a.samples)
        timings["plain"].append(n / sec)
        for w in a.workers:
            n, sec = datamodule_epoch(a.root, w, a.batch_size, a.samples)
            timings[w].append(n / sec)
    plain = timings["plain"]
    rows = [{"reader": "plain PIL loop (1 process)", "workers": 0, "samples_per_s": plain,
             "interval": interval(plain), "ratio_vs_plain": [1.0] * len(plain)}]
    for w in a.workers:
        ratios = [x / y for x, y in zip(timings[w], plain)]
        c = compare(timings[w], plain, paired=True)  # a round times every reader in turn
        rows.append({"reader": "ImageTextDataModule", "workers": w, "samples_per_s": timings[w],
                     "interval": interval(timings[w]), "ratio_vs_plain": ratios, "ratio_interval": interval(ratios),
                     "vs_plain": {"p": c.p_value, "significant": c.significant, "verdict": c.verdict()}})
    print(f"{a.samples} samples per timing, {a.repeats} rounds; mean ± 95% interval")
    print(f"{'reader':<28} {'workers':>7} {'samples/s':>16} {'ratio vs plain':>16}  vs plain")
    for r in rows:
        verdict = r.get("vs_plain", {}).get("verdict", "").replace("A better", "faster").replace("B better", "slower")
        print(f"{r['reader']:<28} {r['workers']:>7} {cell(r['samples_per_s'], 0):>16} "
              f"{cell(r['ratio_vs_plain'], 2):>16}  {verdict}")
    meta = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "image_size": 64, "batch_size": a.batch_size}
    save(a.out, {"meta": {**meta, "samples": a.samples, "repeats": a.repeats}, "rows": rows})


if __name__ == "__main__":
    main()
