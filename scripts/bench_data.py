"""Throughput of the image-text datamodule against a plain PIL decoding loop over the same shards.

    python scripts/bench_data.py --root data/shapes --out bench_data.json

Both sides decode the same JPEG/PNG bytes and apply the same transform (resize/crop/to-tensor/
normalise); the datamodule adds tar streaming, shuffling, batching and worker processes. The
ratio ``datamodule / plain`` says what the streaming machinery costs (0 workers) or gains (>0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tarfile
import time

import torch


def plain_loop(urls: list[str], transform, limit: int) -> tuple[int, float]:
    from datamodules.shards import decode_image_bytes

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

    dm = ImageTextDataModule(train_shards=os.path.join(root, "train"), batch_size=batch, num_workers=workers,
                             image_size=64, samples_per_epoch=limit, shuffle_buffer=256)
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
    p.add_argument("--repeats", type=int, default=2, help="best of N timings per row")
    p.add_argument("--out", default="outputs/bench/data.json")
    a = p.parse_args()
    torch.set_num_threads(1)  # decoding is per-process; keep the plain loop on one core like a worker

    from datamodules.generate import generate_dataset
    from datamodules.shards import expand_shards
    from datamodules.transforms import default_image_transform

    generate_dataset("shapes", a.root)
    urls = expand_shards(os.path.join(a.root, "train"))
    transform = default_image_transform(64, train=True)
    rows = []
    best = min((plain_loop(urls, transform, a.samples) for _ in range(a.repeats)), key=lambda r: r[1])
    plain_rate = best[0] / best[1]
    rows.append({"reader": "plain PIL loop (1 process)", "workers": 0, "samples": best[0], "seconds": best[1],
                 "samples_per_s": plain_rate, "ratio_vs_plain": 1.0})
    for w in a.workers:
        n, s = min((datamodule_epoch(a.root, w, a.batch_size, a.samples) for _ in range(a.repeats)),
                   key=lambda r: r[1])
        rows.append({"reader": "ImageTextDataModule", "workers": w, "samples": n, "seconds": s,
                     "samples_per_s": n / s, "ratio_vs_plain": (n / s) / plain_rate})
    print(f"{'reader':<28} {'workers':>7} {'samples':>8} {'samples/s':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['reader']:<28} {r['workers']:>7} {r['samples']:>8} {r['samples_per_s']:>10.1f} "
              f"{r['ratio_vs_plain']:>7.2f}")
    meta = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "image_size": 64, "batch_size": a.batch_size}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
