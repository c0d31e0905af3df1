"""Export an mmalign CLIP/SigLIP checkpoint as an open_clip checkpoint folder.

    python scripts/export_open_clip.py --ckpt runs/mmalign/version_0/checkpoints/last.ckpt --out exported/

Writes ``open_clip_pytorch_model.bin``, ``open_clip_config.json`` and ``NAME.json`` (the
architecture). Then, in any process, ``open_clip.create_model("local-dir:exported/")``; and, since
the architecture is registered with open_clip (``--no-register`` to skip),
``open_clip.create_model(NAME, pretrained="exported/open_clip_pytorch_model.bin")``.
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="mmalign Lightning checkpoint of a CLIP/SigLIP run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-register", action="store_true", help="do not install NAME.json among open_clip's configs")
    a = p.parse_args()
    from mmalign.contrastive import ContrastiveModule

    module = ContrastiveModule.load_from_checkpoint(a.ckpt, map_location="cpu")
    path = module.export_open_clip(a.out, register=not a.no_register)
    name = module.cfg.model.name
    print(f"wrote {path}, {a.out}/open_clip_config.json and {a.out}/{name}.json"
          + ("" if a.no_register else f"; load with open_clip.create_model('{name}', pretrained='{path}')"))


if __name__ == "__main__":
    main()
