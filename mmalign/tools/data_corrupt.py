"""Write CIFAR-10-C style corrupted copies of image webdataset shards.

    mmalign data corrupt --src data/digits/test --out data/digits-c --severities 3 5
    mmalign data corrupt --src 'data/cifar10/test-{000..009}.tar' --out data/cifar10-c --corruptions gaussian_noise,fog

Writes ``OUT/<corruption>/<severity>/`` shards with the same keys, labels and captions as the source
(the image member re-encoded), the layout ``configs/tta/*_c.yaml`` read (they also write it from the
clean test set on first use).
"""

from __future__ import annotations

import argparse


def _names(values: list[str]) -> list[str]:
    # "--corruptions all", space- or comma-separated names
    names = [n for v in values for n in v.split(",") if n]
    return ["all"] if names == ["all"] else names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", nargs="+", required=True, help="shard paths, a folder, a glob or a brace pattern")
    p.add_argument("--out", required=True, help="output folder: OUT/{corruption}/{severity}/")
    p.add_argument("--corruptions", nargs="+", default=["all"],
                   help="names (space or comma separated) or 'all' (default); an unknown name lists the valid ones")
    p.add_argument("--severities", nargs="+", type=int, default=[5], help="1..5 (default 5)")
    p.add_argument("--seed", type=int, default=0, help="the corruptions' random draws (default 0)")
    p.add_argument("--image-key", default="auto", help="image member extension (jpg, png, ...) or 'auto'")


def run(args: argparse.Namespace) -> None:
    from datamodules.corrupt import corrupt_shards
    from datamodules.corruptions import CORRUPTIONS
    from mmalign.tools import ToolError

    names = _names(args.corruptions)
    names = list(CORRUPTIONS) if names == ["all"] else names
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ToolError(f"--corruptions: unknown {unknown}; valid: {', '.join(CORRUPTIONS)} (or 'all')")
    bad = [s for s in args.severities if not 1 <= s <= 5]
    if bad:
        raise ToolError(f"--severities: {bad} outside 1..5")
    try:
        corrupt_shards(args.src if len(args.src) > 1 else args.src[0], args.out, corruptions=names,
                       severities=args.severities, seed=args.seed, image_key=args.image_key)
    except (ValueError, FileNotFoundError) as err:  # no shards at --src, no image member: one line
        raise ToolError(str(err)) from None
    print(f"wrote {len(names)} corruption(s) x severities {args.severities} to {args.out}")
