"""Export an mmalign CLIP/SigLIP checkpoint as an open_clip checkpoint folder.

    python scripts/export_open_clip.py --ckpt runs/mmalign/version_0/checkpoints/last.ckpt --out exported/

Writes ``open_clip_pytorch_model.bin``, ``open_clip_config.json`` and ``NAME.json`` (the
architecture). Then, in any process, ``open_clip.create_model("local-dir:exported/")``; and, since
the architecture is registered with open_clip (``--no-register`` to skip),
``open_clip.create_model(NAME, pretrained="exported/open_clip_pytorch_model.bin")``.

The network is rebuilt from the checkpoint's architecture alone (``model_name``, ``model_cfg``; read
with ``weights_only=True``); NAME must be a plain name (files are named after it, inside --out), and a
``pkg:`` text tower must be a known weight package (``--weight-package NAME`` allows another).
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="mmalign Lightning checkpoint of a CLIP/SigLIP run")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-register", action="store_true", help="do not install NAME.json among open_clip's configs")
    p.add_argument("--weight-package", action="append", default=[], metavar="NAME",
                   help="also allow pkg:NAME text towers (imports NAME); repeatable")
    a = p.parse_args()
    from mmalign.models.open_clip_models import allow_weight_packages, export_open_clip, open_clip_from_checkpoint
    from mmalign.training.outputs import check_output_dir

    check_output_dir(a.out, "export", "--out")
    allow_weight_packages(a.weight_package)
    model, hp = open_clip_from_checkpoint(a.ckpt)
    name = hp["model"]["name"]
    path = export_open_clip(model, name, a.out, register=not a.no_register)
    print(f"wrote {path}, {a.out}/open_clip_config.json and {a.out}/{name}.json"
          + ("" if a.no_register else f"; load with open_clip.create_model('{name}', pretrained='{path}')"))


if __name__ == "__main__":
    main()
