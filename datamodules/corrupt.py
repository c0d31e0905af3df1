"""Write CIFAR-10-C style corrupted copies of webdataset image shards.

For every (corruption, severity) pair, ``corrupt_shards`` writes ``out_dir/{corruption}/{severity}/``
with one output shard per input shard (same file name, same samples in the same order). Each sample's
image is decoded, corrupted and stored losslessly as ``.png`` (so the only JPEG artefacts are those
of ``jpeg_compression``); every other member (``.cls``, ``.json``, ``.txt``, ...) is copied byte for
byte. Each input shard is read and decoded once and feeds all domains.

Seeds. The per-sample seed is ``SeedSequence([seed, crc32(corruption), severity, shard_index,
sample_index])``, with ``shard_index`` the shard's position in the expanded ``src`` list and
``sample_index`` the sample's position inside its shard. It depends on nothing else (no processing
order, no other domain), so re-running one domain or one shard reproduces the same bytes.

Finished work is kept: each shard is written under a ``.tmp`` name and renamed when complete
(``datamodules.shards.write_shard``), so an interrupted run leaves only whole shards behind. Shards
are read with the same reader as the streams (``iter_tar_samples``).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .corruptions import CORRUPTIONS, check_name_severity, corrupt
from .errors import ShardError
from .samples import IMAGE_EXTS
from .shards import expand_shards, iter_tar_samples, write_shard, write_sizes_file


def _pick_image_key(sample: dict, image_key: str, where: str) -> str:
    if image_key != "auto":
        if image_key not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(f"{where}: no {image_key!r} member (has {members})")
        found = [image_key]
    else:
        found = [k for k in sample if k.lower() in IMAGE_EXTS]
        if not found:
            raise ValueError(f"{where}: no image member ({'/'.join(IMAGE_EXTS)}); members: "
                             f"{sorted(k for k in sample if not k.startswith('__'))}")
        if len(found) > 1:
            raise ValueError(f"{where}: several image members {found}; pass image_key= to choose one")
    key = found[0]
    if "png" in sample and key != "png":
        raise ValueError(f"{where}: output image would overwrite the existing 'png' member; "
                         "pass image_key='png' or drop it")
    return key


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def sample_seed(seed: int, corruption: str, severity: int, shard_index: int, sample_index: int) -> int:
    """Per-sample seed, a pure function of its arguments (see the module docstring)."""
    entropy = [int(seed), zlib.crc32(corruption.encode()), int(severity), int(shard_index), int(sample_index)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def corrupt_shards(
    src: str | list[str],
    out_dir: str,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (5,),
    seed: int = 0,
    image_key: str = "auto",
    verbose: bool = True,
) -> dict:
    """Write ``out_dir/{corruption}/{severity}/<shard name>`` for every pair; return the manifest.

    ``image_key``: the image member's extension, or ``"auto"`` to take the one member among
    jpg/jpeg/png/webp (ambiguous samples raise). The image is decoded as RGB (grayscale and
    alpha images are converted), corrupted and stored as ``png``; the original image member is
    dropped. ``manifest.json`` in ``out_dir`` lists the shards and sample counts per domain; each
    domain folder gets a ``sizes.json``.
    """
    corruptions = list(corruptions)
    severities = [int(s) for s in severities]
    if not corruptions or not severities:
        raise ValueError("need at least one corruption and one severity")
    for name in corruptions:
        for sev in severities:
            check_name_severity(name, sev)
    if image_key != "auto" and not image_key:
        raise ValueError("image_key must be 'auto' or an extension such as 'jpg'")
    try:
        shards = expand_shards(src, "corrupt_shards src")
    except ShardError as exc:
        raise FileNotFoundError(str(exc)) from exc
    names = [os.path.basename(p) for p in shards]
    if len(set(names)) != len(names):  # output shards reuse the input file names inside one folder
        raise ValueError("input shards must have distinct file names (outputs reuse them)")
    try:  # before any work: a read-only output fails here, in one line
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise PermissionError(f"cannot write the corrupted domains into '{out_dir}' ({exc.strerror or exc}). Point "
                              "benchmark.dir (or shards.data_root) at a writable folder.") from None
    domains = [(c, s) for c in corruptions for s in severities]
    sizes: dict[tuple, dict[str, int]] = {d: {} for d in domains}
    start, total = time.time(), 0
    for shard_index, path in enumerate(shards):
        errors: list[str] = []
        clean = []  # each input shard is read and decoded once and feeds every domain
        for raw in iter_tar_samples(path, errors):
            where = f"{path} sample {raw['__key__']!r}"
            key = _pick_image_key(raw, image_key, where)
            try:
                image = np.asarray(Image.open(io.BytesIO(raw[key])).convert("RGB"))
            except Exception as err:  # PIL raises several types for bad data
                raise ValueError(f"{where}: cannot decode {key!r} image: {err}") from err
            clean.append(({k: v for k, v in raw.items() if k not in (key, "__url__")}, image))
        if errors:  # a corrupted copy of half a shard would silently shrink the benchmark
            raise ShardError(f"{errors[0]}. Re-create the shard before corrupting it.")
        name = os.path.basename(path)
        for c, s in domains:
            samples = ({**rest, "png": _png_bytes(corrupt(img, c, s, seed=sample_seed(seed, c, s, shard_index, i)))}
                       for i, (rest, img) in enumerate(clean))
            sizes[(c, s)][name] = write_shard(os.path.join(out_dir, c, str(s), name), samples, encoder=False)
        total += len(clean)
        if verbose:
            print(f"[corrupt_shards] {shard_index + 1}/{len(shards)} {name}: {len(clean)} samples x "
                  f"{len(domains)} domains ({total} samples, {time.time() - start:.1f}s)", flush=True)
    for (c, s), counts in sizes.items():
        write_sizes_file(os.path.join(out_dir, c, str(s)), counts)
    manifest = {
        "src": [os.path.abspath(p) for p in shards], "seed": int(seed), "image_key": image_key,
        "image_format": "png", "corruptions": corruptions, "severities": severities, "shards": names,
        "samples_per_domain": {f"{c}/{s}": sum(v.values()) for (c, s), v in sizes.items()},
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    if verbose:
        print(f"[corrupt_shards] wrote {len(domains)} domains x {total} samples to {out_dir} "
              f"in {time.time() - start:.1f}s", flush=True)
    return manifest
