"""Compute CAFA's source statistics for a classifier checkpoint and store them next to it.

    mmalign tta stats --checkpoint runs/mmalign/version_0/checkpoints/last.ckpt --shards data/digits/train

writes ``runs/mmalign/version_0/checkpoints/last.cafa_stats.pt`` (``--out`` for another path), always
recomputed. ``mmalign adapt`` picks that file up, or computes it itself when it is missing: this
command is for computing it once, ahead of several adaptation runs, or on a bigger source subset.
The statistics are class-conditional Gaussians of the source features (CAFA, Jung et al.), from
``--max-samples`` labelled source samples.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="ImageClassifier checkpoint (or plain weights + --model-name)")
    p.add_argument("--model-name", default=None, help="timm name, when the checkpoint is plain weights")
    p.add_argument("--num-classes", type=int, default=None, help="with --model-name: the classifier's classes")
    p.add_argument("--shards", required=True, help="labelled source shards (folder, glob or brace pattern)")
    p.add_argument("--label-key", default="cls", help="'cls' or a json field (e.g. shape_id)")
    p.add_argument("--max-samples", type=int, default=2000, help="labelled source subset size (default 2000)")
    p.add_argument("--covariance", default="auto", choices=["auto", "shared", "classwise"],
                   help="one covariance shared by all classes, one per class, or auto (per class unless the C*d*d "
                        "matrices would pass ~400 MB)")
    p.add_argument("--shrinkage", type=float, default=0.1, help="covariance shrinkage towards the diagonal, in [0, 1)")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch (default 256)")
    p.add_argument("--out", default=None, help="default: <checkpoint stem>.cafa_stats.pt beside the checkpoint")


def run(args: argparse.Namespace) -> str:
    import os

    from mmalign.tools import ToolError

    if not os.path.isfile(args.checkpoint):
        raise ToolError(f"--checkpoint {args.checkpoint!r}: no such file")
    for flag in ("max_samples", "batch_size", "num_classes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ToolError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.shrinkage < 1:
        raise ToolError(f"--shrinkage must be in [0, 1), got {args.shrinkage}")

    from datamodules import ImageLabelDataModule
    from mmalign.tta import TTAModel
    from mmalign.tta.pipeline import source_statistics

    kind = "timm" if args.model_name else None
    model = TTAModel({"checkpoint": args.checkpoint, "kind": kind, "name": args.model_name,
                      "num_classes": args.num_classes}, methods=["source"],
                     cafa={"stats": args.out, "covariance": args.covariance, "shrinkage": args.shrinkage})
    dm = ImageLabelDataModule(shards={"train": args.shards}, stream={"num_workers": 0, "batch_size": args.batch_size},
                              label={"key": args.label_key, "num_classes": model.num_classes},
                              preprocess=model.preprocess)
    out = model.stats_path(".")
    if os.path.isfile(out):
        os.remove(out)  # always recomputed: that is what this command is for
    stats = source_statistics(model, dm, ".", "cpu", print, args.max_samples)
    print(f"[tta stats] {stats.covariance} covariance, shrinkage {stats.shrinkage}, "
          f"{stats.meta['num_samples']} samples, d={stats.meta['feature_dim']} -> {out}")
    return out
