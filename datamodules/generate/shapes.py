"""``shapes``: coloured shapes with attributes, captions and held-out attribute combinations.

Each image shows one shape (6 kinds) in one colour (6), size (2), position (5) and background (3).
Six shape-colour combinations — one per shape and one per colour, chosen by the seed — never occur
in train/val/test and make up the ``heldout`` split: zero-shot accuracy there measures whether a
model composes "red" and "circle" it has only seen apart.

Labels: ``.cls`` is the combination id ``shape * 6 + colour`` (36 classes, names in
``classes.json``); the json carries every attribute and its id.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from . import encode_image, write_class_spec, write_split

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
COLORS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220),
          "yellow": (235, 205, 35), "purple": (140, 55, 175), "orange": (245, 135, 25)}
SIZES = {"small": (0.12, 0.16), "large": (0.22, 0.27)}  # radius as a fraction of the image side
POSITIONS = {"center": (0.5, 0.5), "top left": (0.3, 0.3), "top right": (0.7, 0.3),
             "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}
BACKGROUNDS = {"white": (236, 236, 236), "black": (22, 22, 22), "gray": (128, 128, 128)}
CAPTION_TEMPLATES = (
    "a {size} {color} {shape} {where} on a {background} background",
    "a {color} {shape}",
    "a picture of a {color} {shape} on {background}",
    "{where_cap}: a {size} {color} {shape}",
    "there is a {color} {shape} {where}",
    "a {size} {shape}, coloured {color}",
    "a {background} image with a {color} {shape}",
    "the {shape} is {color} and {size}",
    "a {shape} in {color}",
    "{color} {shape}, {size}, {where}",
)
PROMPT_TEMPLATES = ["a photo of a {}.", "a {} on a plain background.", "an image of a {}.", "a drawing of a {}.",
                    "a small {}.", "a large {}."]
SUPERSAMPLE = 4


def heldout_combos(seed: int) -> set[tuple[int, int]]:
    """One colour per shape, a permutation, so every shape and every colour stays in training."""
    perm = list(range(len(COLORS)))
    random.Random(f"shapes-heldout-{seed}").shuffle(perm)
    return {(s, perm[s]) for s in range(len(SHAPES))}


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list:
    pts = []
    steps = 2 * n if inner else n
    for k in range(steps):
        rad = r if (inner is None or k % 2 == 0) else r * inner
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color, rot: float) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, rot + math.pi / 4), fill=color)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, rot - math.pi / 2), fill=color)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.25, 5, rot - math.pi / 2, inner=0.45), fill=color)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r * 1.1, 6, rot), fill=color)
    elif shape == "cross":
        w = r * 0.38
        c, s = math.cos(rot), math.sin(rot)
        for dx, dy in ((r * 1.1, w), (w, r * 1.1)):
            corners = [(-dx, -dy), (dx, -dy), (dx, dy), (-dx, dy)]
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(attrs: dict, image_size: int, rng: random.Random) -> Image.Image:
    big = image_size * SUPERSAMPLE
    bg = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in BACKGROUNDS[attrs["background"]])
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    lo, hi = SIZES[attrs["size"]]
    r = rng.uniform(lo, hi) * big
    px, py = POSITIONS[attrs["position"]]
    cx, cy = (px + rng.uniform(-0.04, 0.04)) * big, (py + rng.uniform(-0.04, 0.04)) * big
    color = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in COLORS[attrs["color"]])
    draw_shape(draw, attrs["shape"], cx, cy, r, color, rng.uniform(-0.3, 0.3))
    return img.resize((image_size, image_size), Image.LANCZOS)


def caption(attrs: dict, rng: random.Random) -> str:
    where = "in the center" if attrs["position"] == "center" else f"in the {attrs['position']}"
    text = rng.choice(CAPTION_TEMPLATES).format(where=where, where_cap=where[0].upper() + where[1:], **attrs)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def sample_attrs(rng: random.Random, combos: list[tuple[int, int]]) -> dict:
    s, c = rng.choice(combos)
    return {"shape": SHAPES[s], "color": list(COLORS)[c], "size": rng.choice(list(SIZES)),
            "position": rng.choice(list(POSITIONS)), "background": rng.choice(list(BACKGROUNDS)),
            "shape_id": s, "color_id": c, "combo_id": s * len(COLORS) + c}


def _samples(split: str, n: int, combos, image_size: int, seed: int):
    rng = random.Random(f"shapes-{split}-{seed}")
    fmt_cycle = ("jpg", "jpg", "png")
    for i in range(n):
        attrs = sample_attrs(rng, combos)
        img = render(attrs, image_size, rng)
        text = caption(attrs, rng)
        fmt = fmt_cycle[i % len(fmt_cycle)]  # mixed encodings, as in scraped data
        yield {"__key__": f"{split}-{i:07d}", fmt: encode_image(img, fmt), "txt": text,
               "cls": str(attrs["combo_id"]), "json": {**attrs, "caption": text, "heldout": split == "heldout"}}


def generate(root: str, seed: int = 0, image_size: int = 64, num_train: int = 6000, num_val: int = 600,
             num_test: int = 1200, num_heldout: int = 1200, shard_size: int = 500) -> dict:
    held = heldout_combos(seed)
    all_combos = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLORS))]
    seen = [x for x in all_combos if x not in held]
    counts = {}
    for split, n, combos in (("train", num_train, seen), ("val", num_val, seen), ("test", num_test, seen),
                             ("heldout", num_heldout, sorted(held))):
        counts[split] = write_split(f"{root}/{split}", _samples(split, n, combos, image_size, seed), shard_size)
    colors = list(COLORS)
    write_class_spec(root, "classes.json", [f"{colors[c]} {SHAPES[s]}" for s, c in all_combos], PROMPT_TEMPLATES)
    write_class_spec(root, "classes_shape.json", list(SHAPES), PROMPT_TEMPLATES)
    write_class_spec(root, "classes_color.json", [f"{c} shape" for c in colors], PROMPT_TEMPLATES)
    return {"splits": counts, "seed": seed, "image_size": image_size, "num_classes": len(all_combos),
            "heldout_combos": sorted(f"{colors[c]} {SHAPES[s]}" for s, c in held)}
