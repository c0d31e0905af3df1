#!/usr/bin/env python
"""Convert an image folder or a CSV of (image path, caption) into img2dataset-style webdataset shards.

    python scripts/to_shards.py --imagefolder /data/pets --out /data/pets-shards
    python scripts/to_shards.py --csv captions.csv --out /data/caps-shards --shard-size 5000

Each sample is ``{key}.{jpg|png|webp}`` (the original bytes; other formats are re-encoded as JPEG),
``{key}.txt`` (the caption: the CSV's, or ``--caption-template`` filled with the class name for a
folder), ``{key}.cls`` (class index, for a labelled folder or a CSV ``label`` column) and
``{key}.json`` (source path, class name, caption). A ``sizes.json`` lists the shard counts and a
``classes.json`` (class names + templates, the zero-shot class-spec format) is written for labelled
input. A progress bar shows images written; unreadable images are skipped and counted.

CSV: a header row; the image column is ``image``/``path``/``filepath``/``url`` (a local path,
relative to the CSV's folder), the caption column ``caption``/``text``/``title``, optionally
``label`` (an integer class). ``--image-col``/``--caption-col`` name them explicitly.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys

KEEP = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
IMAGE_COLS, CAPTION_COLS = ("image", "path", "filepath", "url", "file"), ("caption", "text", "title")


def _folder_items(root: str, template: str):
    from datamodules.folders import scan

    listing = scan(root)
    for rel, cls in listing.files:
        name = listing.classes[cls].replace("_", " ") if cls >= 0 else None
        yield {"path": os.path.join(listing.root, rel), "key": rel.rpartition(".")[0],
               "caption": template.format(name) if name else None, "label": cls if cls >= 0 else None,
               "class": name}


def _pick(header: list[str], given: str | None, choices: tuple[str, ...], what: str) -> str | None:
    if given:
        if given not in header:
            sys.exit(f"error: --{what}-col {given!r} is not a column of the CSV (columns: {header})")
        return given
    return next((c for c in header if c.lower() in choices), None)


def _csv_items(path: str, image_col: str | None, caption_col: str | None):
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        image_col = _pick(header, image_col, IMAGE_COLS, "image")
        caption_col = _pick(header, caption_col, CAPTION_COLS, "caption")
        if image_col is None:
            sys.exit(f"error: no image column in {path} (columns: {header}); name it with --image-col")
        for i, row in enumerate(reader):
            img = row[image_col]
            if "://" in img:
                sys.exit(f"error: row {i + 2}: {img!r} is a URL; this converter reads local files only")
            label = row.get("label")
            yield {"path": img if os.path.isabs(img) else os.path.join(base, img), "key": f"{i:09d}",
                   "caption": row.get(caption_col) if caption_col else None,
                   "label": int(label) if label not in (None, "") else None, "class": None}


def _sample(item: dict) -> dict:
    ext = item["path"].rpartition(".")[2].lower()
    with open(item["path"], "rb") as f:
        data = f.read()
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # fail here, not in training, on a corrupt file
    if ext not in KEEP:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=95)
        data, ext = buf.getvalue(), "jpg"
    sample = {"__key__": item["key"].replace(".", "_"), KEEP.get(ext, ext): data,
              "json": {k: v for k, v in (("path", item["path"]), ("class", item["class"]),
                                         ("caption", item["caption"])) if v is not None}}
    if item["caption"]:
        sample["txt"] = item["caption"]
    if item["label"] is not None:
        sample["cls"] = str(item["label"])
    return sample


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--imagefolder", help="root/<class>/*.jpg (labelled) or a folder of images")
    src.add_argument("--csv", help="CSV with an image-path column and a caption column")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--prefix", default="shard", help="shard names: PREFIX-NNNNNN.tar")
    p.add_argument("--shuffle", action="store_true", help="shuffle the samples (with --seed) before sharding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--caption-template", default="a photo of a {}.", help="folder input: caption per class")
    p.add_argument("--image-col")
    p.add_argument("--caption-col")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        p.error(f"--out {args.out!r} exists and is not empty")

    from tqdm import tqdm

    from datamodules.shards import write_shards

    items = list(_folder_items(args.imagefolder, args.caption_template) if args.imagefolder
                 else _csv_items(args.csv, args.image_col, args.caption_col))
    if args.shuffle:
        random.Random(args.seed).shuffle(items)
    skipped: list[str] = []

    def samples():
        for item in tqdm(items, desc="images", unit="img"):
            try:
                yield _sample(item)
            except (OSError, ValueError) as exc:  # unreadable or not an image: skip and count
                skipped.append(f"{item['path']}: {exc}")

    sizes = write_shards(args.out, samples(), args.shard_size, args.prefix)
    info = {"samples": sum(sizes.values()), "shards": len(sizes), "skipped": len(skipped), "examples": skipped[:5]}
    if args.imagefolder:
        from datamodules.folders import scan
        from mmalign.evaluation.prompts import default_templates

        classes = [c.replace("_", " ") for c in scan(args.imagefolder).classes]
        if classes:
            with open(os.path.join(args.out, "classes.json"), "w") as f:
                json.dump({"classnames": classes, "templates": list(default_templates())}, f, indent=1)
            info["classes"] = len(classes)
    print(f"wrote {info['samples']} samples in {info['shards']} shards to {args.out}; skipped {len(skipped)}"
          + (f" (e.g. {skipped[0]})" if skipped else ""))
    return info


if __name__ == "__main__":
    main()
