#!/usr/bin/env python
"""Write CIFAR-10-C style corrupted copies of webdataset shards.

Example:
    python scripts/make_corrupted.py --src data/cifar10/test-{000..009}.tar \\
        --out data/cifar10-c --severities 5
"""

from __future__ import annotations

import argparse

from datamodules.corrupt import corrupt_shards
from datamodules.corruptions import CORRUPTIONS


def _names(values: list[str]) -> list[str]:
    # accept "--corruptions all", space- or comma-separated names
    names = [n for v in values for n in v.split(",") if n]
    return list(CORRUPTIONS) if names == ["all"] else names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", nargs="+", required=True,
                        help="shard paths, a directory, a glob or a brace pattern")
    parser.add_argument("--out", required=True, help="output folder: OUT/{corruption}/{severity}/")
    parser.add_argument("--corruptions", nargs="+", default=["all"],
                        help=f"names (space/comma separated) or 'all'; valid: {', '.join(CORRUPTIONS)}")
    parser.add_argument("--severities", nargs="+", type=int, default=[5], help="1..5 (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-key", default="auto", help="image member extension, or 'auto'")
    args = parser.parse_args(argv)
    try:
        corrupt_shards(args.src if len(args.src) > 1 else args.src[0], args.out,
                       corruptions=_names(args.corruptions), severities=args.severities,
                       seed=args.seed, image_key=args.image_key)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
