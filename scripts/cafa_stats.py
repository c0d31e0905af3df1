#!/usr/bin/env python
"""Compute CAFA's source statistics for a checkpoint and store them next to it.

Example:
    python scripts/cafa_stats.py --checkpoint runs/mmalign/version_0/checkpoints/last.ckpt \\
        --shards data/digits/train --max-samples 2000
writes ``runs/mmalign/version_0/checkpoints/last.cafa_stats.pt`` (``--out`` to choose another
path). ``python -m mmalign adapt`` picks that file up, or computes it itself when it is missing.
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="ImageClassifier checkpoint (or weights + --model-name)")
    parser.add_argument("--model-name", default=None, help="timm name, when the checkpoint is plain weights")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--shards", required=True, help="labelled source shards (dir, glob or brace pattern)")
    parser.add_argument("--label-key", default="cls", help="'cls' or a json field (e.g. shape_id)")
    parser.add_argument("--max-samples", type=int, default=2000, help="labelled source subset size")
    parser.add_argument("--covariance", default="auto", choices=["auto", "shared", "classwise"])
    parser.add_argument("--shrinkage", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="default: <checkpoint stem>.cafa_stats.pt")
    args = parser.parse_args(argv)

    from datamodules import ImageLabelDataModule
    from mmalign.tta import TTAModel
    from mmalign.tta.pipeline import source_statistics

    model = TTAModel(args.checkpoint, args.model_name, args.num_classes, methods=["source"], cafa_stats=args.out,
                     cafa_covariance=args.covariance, cafa_shrinkage=args.shrinkage)
    dm = ImageLabelDataModule(shards={"train": args.shards}, stream={"num_workers": 0, "batch_size": args.batch_size},
                              label={"key": args.label_key, "num_classes": model.num_classes},
                              preprocess=model.preprocess)
    out = model.stats_path(".")
    if os.path.isfile(out):
        os.remove(out)  # this script always recomputes
    stats = source_statistics(model, dm, ".", "cpu", print, args.max_samples)
    print(f"[cafa_stats] {stats.covariance} covariance, shrinkage {stats.shrinkage}, "
          f"{stats.meta['num_samples']} samples, d={stats.meta['feature_dim']} -> {out}")
    return out


if __name__ == "__main__":
    main()
