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

CSV (UTF-8): a header row; the image column is ``image``/``path``/``filepath``/``url`` (a local path,
relative to the CSV's folder), the caption column ``caption``/``text``/``title``, optionally
``label``/``class``/``cls`` (a class index: ``3``, `` 3 ``, ``3.0``). ``--image-col``/``--caption-col``/
``--label-col`` name them explicitly. A row whose label is not a class index, or that has more fields
than the header, stops the conversion with its line number; a row whose image is missing or
unreadable is skipped and counted, named by its line number.

Keys are unique: files that share a name up to the first dot (``img0.png`` + ``img0.jpg``, ``a.b.png`` +
``a_b.png``) would otherwise become one sample; the later ones get their extension added to the key.
The counts printed and written to ``sizes.json`` are those of the samples in the tars.
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
        yield {"path": os.path.join(listing.root, rel), "key": rel.rpartition(".")[0], "where": rel,
               "caption": template.format(name) if name else None, "label": cls if cls >= 0 else None,
               "class": name}


def unique_keys(items: list[dict]) -> int:
    """Give every item a key no other item has; returns how many keys had to change.

    A webdataset key ends at the first dot of a file name, and a reader joins consecutive members of
    one key into one sample: ``img0.png`` + ``img0.jpg`` (one key ``img0``), or ``a.b.png`` + ``a_b.png``
    (dots become ``_``), would be merged into one sample while both were counted. The first file keeps
    the plain key; a later one adds its extension (``img0_jpg``), then a number if still taken."""
    used: set[str] = set()
    changed = 0
    for item in items:
        base = item["key"].replace(".", "_")
        key, n = base, 1
        if key in used:
            key = f"{base}_{item['path'].rpartition('.')[2].lower()}"
            while key in used:
                n += 1
                key = f"{base}_{item['path'].rpartition('.')[2].lower()}{n}"
            changed += 1
        used.add(key)
        item["key"] = key
    return changed


def _pick(header: list[str], given: str | None, choices: tuple[str, ...], what: str) -> str | None:
    if given:
        if given not in header:
            sys.exit(f"error: --{what}-col {given!r} is not a column of the CSV (columns: {header})")
        return given
    return next((c for c in header if c.lower() in choices), None)


def _csv_label(text: str | None, where: str) -> int | None:
    """``3``, `` 3 ``, ``3.0`` -> 3; empty -> None; anything else is a wrong column, not a label to guess."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value == value or value != int(value) or value < 0:  # NaN, 2.5, -1
        sys.exit(f"error: {where}: label {text!r} is not a class index (a whole number >= 0). Fix the row, or name "
                 "the label column with --label-col.")
    return int(value)


def _csv_items(path: str, image_col: str | None, caption_col: str | None, label_col: str | None = None):
    """Items of a CSV; rows are named by their line number (the header is line 1)."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            image_col = _pick(header, image_col, IMAGE_COLS, "image")
            caption_col = _pick(header, caption_col, CAPTION_COLS, "caption")
            label_col = _pick(header, label_col, ("label", "class", "cls"), "label")
            if image_col is None:
                sys.exit(f"error: no image column in {path} (columns: {header}); name it with --image-col")
            for i, row in enumerate(reader):
                where = f"{path}: row {reader.line_num}"
                if None in row:
                    sys.exit(f"error: {where} has more fields than the header ({len(header)}); quote fields "
                             "that hold commas.")
                img = (row.get(image_col) or "").strip()
                if "://" in img:
                    sys.exit(f"error: {where}: {img!r} is a URL; this converter reads local files only")
                caption = row.get(caption_col) if caption_col else None
                yield {"path": (img if os.path.isabs(img) else os.path.join(base, img)) if img else "",
                       "key": f"{i:09d}", "where": f"row {reader.line_num}", "caption": caption,
                       "label": _csv_label(row.get(label_col), where) if label_col else None, "class": None}
    except UnicodeDecodeError as exc:
        sys.exit(f"error: {path} is not UTF-8 text ({exc}); save it as UTF-8.")
    except csv.Error as exc:
        sys.exit(f"error: {path}: malformed CSV ({exc}).")


def _sample(item: dict) -> dict:
    if not item["path"]:
        raise ValueError("empty image path")
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
    sample = {"__key__": item["key"], KEEP.get(ext, ext): data,
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
    p.add_argument("--label-col", help="CSV column of the class index (default: label/class/cls when present)")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if os.path.exists(args.out) and os.listdir(args.out):
        p.error(f"--out {args.out!r} exists and is not empty")

    from tqdm import tqdm

    from datamodules.shards import write_shards

    items = list(_folder_items(args.imagefolder, args.caption_template) if args.imagefolder
                 else _csv_items(args.csv, args.image_col, args.caption_col, args.label_col))
    renamed = unique_keys(items)
    if args.shuffle:
        random.Random(args.seed).shuffle(items)
    skipped: list[str] = []

    def samples():
        for item in tqdm(items, desc="images", unit="img"):
            try:
                yield _sample(item)
            except (OSError, ValueError) as exc:  # unreadable or not an image: skip and count
                skipped.append(f"{item['where']}: {item['path'] or '-'}: {exc}")

    sizes = write_shards(args.out, samples(), args.shard_size, args.prefix)  # counts of what is in the tars
    info = {"samples": sum(sizes.values()), "shards": len(sizes), "skipped": len(skipped), "examples": skipped[:5],
            "renamed_keys": renamed}
    if args.imagefolder:
        from datamodules.folders import scan
        from mmalign.evaluation.prompts import default_templates

        classes = [c.replace("_", " ") for c in scan(args.imagefolder).classes]
        if classes:
            with open(os.path.join(args.out, "classes.json"), "w") as f:
                json.dump({"classnames": classes, "templates": list(default_templates())}, f, indent=1)
            info["classes"] = len(classes)
    print(f"wrote {info['samples']} samples in {info['shards']} shards to {args.out}; skipped {len(skipped)}"
          + (f" (e.g. {skipped[0]})" if skipped else "")
          + (f"; {renamed} key(s) extended to stay unique (files sharing a name up to the first dot)" if renamed
             else ""))
    return info


if __name__ == "__main__":
    main()
