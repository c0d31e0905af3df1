"""Export an mmalign CLIP/SigLIP checkpoint as a portable open_clip folder.

    mmalign export --ckpt runs/mmalign/version_0/checkpoints/last.ckpt --out exported/

The folder holds everything the model needs and names no path outside itself, so it can be moved or
copied to another machine (one with open_clip, and transformers for an HF text tower):
  open_clip_pytorch_model.bin   the weights (image tower, text tower, projections, logit scale)
  open_clip_config.json         architecture and preprocessing: what open_clip's local-dir: reads
  NAME.json                     the architecture alone, open_clip's model-config format
  config.json, tokenizer*, vocab*  an HF text tower's config and tokenizer (the packaged
                                all-MiniLM-L6-v2's, for the quick start), named "." in the config

Load it with open_clip alone:
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:exported")
    tokenizer = open_clip.get_tokenizer("local-dir:exported")
open_clip passes an HF text tower's "." to transformers, which reads it against the working
directory: for such a model run that from inside the folder, or from anywhere with
mmalign.models.open_clip_models.load_exported("exported").

Nothing is written outside --out unless --register: that installs NAME.json among open_clip's own
model configs (inside its installed package), so that open_clip.create_model(NAME,
pretrained="exported/open_clip_pytorch_model.bin") works in any process on this machine.

The network is rebuilt from the checkpoint's architecture alone (read with weights_only=True); its
name must be a plain name, and a pkg: text tower must be a known weight package (--weight-package
allows another, importing it).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="mmalign Lightning checkpoint of a CLIP/SigLIP run (last.ckpt)")
    p.add_argument("--out", required=True, help="output folder (new, or empty)")
    p.add_argument("--register", action="store_true",
                   help="also install NAME.json among open_clip's model configs (writes into site-packages)")
    p.add_argument("--weight-package", action="append", default=[], metavar="NAME",
                   help="also allow pkg:NAME text towers (imports NAME); repeatable")


def run(args: argparse.Namespace) -> str:
    import os

    from mmalign.tools import ToolError

    if not os.path.isfile(args.ckpt):
        raise ToolError(f"--ckpt {args.ckpt!r}: no such file (give the last.ckpt of a CLIP/SigLIP run)")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise ToolError(f"--out {args.out!r} exists and is not an empty folder; choose a new one")

    from mmalign.models.open_clip_models import allow_weight_packages, export_open_clip, open_clip_from_checkpoint
    from mmalign.training.outputs import check_output_dir

    check_output_dir(args.out, "export", "--out", create=False)  # writable, yet nothing created before the model loads
    allow_weight_packages(args.weight_package)
    model, hp = open_clip_from_checkpoint(args.ckpt)
    name = hp["model"]["name"]
    path = export_open_clip(model, name, args.out, register=args.register)
    files = sorted(os.listdir(args.out))
    print(f"wrote {args.out}: {', '.join(files)}\nload with open_clip.create_model_and_transforms('local-dir:{args.out}')"
          + (f" or open_clip.create_model('{name}', pretrained='{path}')" if args.register else ""))
    return path
