"""Export an mmalign CLIP/SigLIP checkpoint as an open_clip checkpoint folder.

    python scripts/export_open_clip.py --ckpt runs/mmalign/version_0/checkpoints/last.ckpt --out exported/

Then ``open_clip.create_model("local-dir:exported/")``, or
``open_clip.create_model(NAME, pretrained="exported/open_clip_pytorch_model.bin")`` when NAME is a
registered architecture.
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="mmalign Lightning checkpoint of a CLIP/SigLIP run")
    p.add_argument("--out", required=True, help="output folder")
    a = p.parse_args()
    from mmalign.contrastive import ContrastiveModule

    module = ContrastiveModule.load_from_checkpoint(a.ckpt, map_location="cpu")
    path = module.export_open_clip(a.out)
    print(f"wrote {path} and {a.out}/open_clip_config.json (model_name={module.hparams.model_name})")


if __name__ == "__main__":
    main()
