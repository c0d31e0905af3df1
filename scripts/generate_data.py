"""Write a built-in dataset as webdataset shards (the datamodules also do this on first use).

    python scripts/generate_data.py shapes --root data/shapes
    python scripts/generate_data.py digits --root data/digits --seed 1 --image-size 48
"""

from __future__ import annotations

import argparse
import json
import logging

from datamodules.generate import GENERATORS, generate_dataset
from datamodules.specs import GenerateSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(GENERATORS))
    p.add_argument("--root", required=True, help="output directory (must not exist yet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--shard-size", type=int, default=None)
    p.add_argument("--num-train", type=int, default=None, help="shapes only")
    p.add_argument("--num-val", type=int, default=None, help="shapes only")
    p.add_argument("--num-test", type=int, default=None, help="shapes only")
    p.add_argument("--num-heldout", type=int, default=None, help="shapes only")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kwargs = {k: v for k, v in vars(a).items() if k not in ("dataset", "root") and v is not None}
    try:  # the datamodules' own check: an option the generator lacks, or a zero/negative size, in one line
        GenerateSpec(a.dataset, kwargs)
    except ValueError as exc:
        p.error(str(exc))
    info = generate_dataset(a.dataset, a.root, **kwargs)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
