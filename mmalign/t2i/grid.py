"""PNG grids of generated images, each captioned with its prompt."""

from __future__ import annotations

import os
import textwrap

import torch
from torch import Tensor


def save_captioned_grid(images: Tensor, captions: list[str], path: str, cols: int = 8, cell: int = 96) -> str:
    """Write ``images`` ([-1, 1], (N, 3, H, W)) as a grid of ``cell``-pixel tiles (nearest-neighbour
    upscaling, so small images stay sharp) with each caption wrapped below its tile; atomic write."""
    from PIL import Image, ImageDraw, ImageFont

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions.")
    font = ImageFont.load_default()
    chars = max(8, cell // 6)  # the default bitmap font is about 6 px per character
    wrapped = [textwrap.wrap(c, chars)[:3] or [""] for c in captions]
    line_h = 11
    text_h = line_h * max(len(w) for w in wrapped) + 4
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, (img, lines) in enumerate(zip(arr, wrapped)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 2, y + cell + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    sheet.save(tmp)
    os.replace(tmp, path)
    return path
