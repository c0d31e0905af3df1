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

Finished work is kept: each shard is written under a ``.tmp`` name and renamed when complete, so an
interrupted run leaves only whole shards behind.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import time
import zlib
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from mmalign.tta.corruptions import CORRUPTIONS, check_name_severity, corrupt

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_SHARD_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")


def expand_shards(src: str | Sequence[str]) -> list[str]:
    """Resolve ``src`` to shard paths: a list of paths, one path, a directory (its ``*.tar``
    files, sorted), a glob or a brace pattern ``shard-{000..009}.tar``."""
    items = [src] if isinstance(src, str) else list(src)
    paths: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(p for pat in _SHARD_PATTERNS for p in glob.glob(os.path.join(item, pat)))
            if not found:
                raise FileNotFoundError(f"no .tar shards in directory {item!r}")
            paths += found
        elif "{" in item:
            import braceexpand  # a webdataset dependency

            paths += list(braceexpand.braceexpand(item))
        elif any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"glob {item!r} matched no shards")
            paths += found
        else:
            paths.append(item)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if not paths:
        raise ValueError("src names no shards")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        # output shards reuse the input file names inside one folder
        raise ValueError("input shards must have distinct file names (outputs reuse them)")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: key = path up to the first dot of the basename."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return name, ""
    return match.group(1), match.group(2)


def iter_samples(path: str) -> Iterator[dict[str, bytes | str]]:
    """Yield samples of one tar shard as ``{"__key__": key, ext: bytes, ...}`` in file order
    (consecutive members sharing a key form one sample, as in webdataset)."""
    sample: dict[str, bytes | str] | None = None
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_name(member.name)
            if not ext or os.path.basename(key).startswith("__"):
                continue
            data = tar.extractfile(member).read()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            sample[ext] = data
    if sample is not None:
        yield sample


def _pick_image_key(sample: dict, image_key: str, where: str) -> str:
    if image_key != "auto":
        if image_key not in sample:
            members = sorted(k for k in sample if k != "__key__")
            raise ValueError(f"{where}: no {image_key!r} member (has {members})")
        found = [image_key]
    else:
        found = [k for k in sample if k.lower() in IMAGE_EXTS]
        if not found:
            raise ValueError(f"{where}: no image member ({'/'.join(IMAGE_EXTS)}); members: "
                           f"{sorted(k for k in sample if k != '__key__')}")
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
    dropped. ``manifest.json`` in ``out_dir`` lists the shards and sample counts per domain.
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
    shards = expand_shards(src)
    domains = [(c, s) for c in corruptions for s in severities]
    counts = {f"{c}/{s}": 0 for c, s in domains}
    os.makedirs(out_dir, exist_ok=True)
    for c, s in domains:
        os.makedirs(os.path.join(out_dir, c, str(s)), exist_ok=True)

    import webdataset as wds  # heavy-ish import only where shards are written

    start = time.time()
    total = 0
    for shard_index, path in enumerate(shards):
        name = os.path.basename(path)
        finals = {d: os.path.join(out_dir, d[0], str(d[1]), name) for d in domains}
        tmps = {d: f + ".tmp" for d, f in finals.items()}
        files = {d: open(t, "wb") for d, t in tmps.items()}
        n = 0
        try:
            compress = name.endswith(("gz", "tgz")) or None
            writers = {d: wds.TarWriter(files[d], encoder=False, compress=compress, mtime=0.0)
                       for d in domains}
            for sample_index, sample in enumerate(iter_samples(path)):
                where = f"{path} sample {sample['__key__']!r}"
                key = _pick_image_key(sample, image_key, where)
                try:
                    clean = np.asarray(Image.open(io.BytesIO(sample[key])).convert("RGB"))
                except Exception as err:  # PIL raises several types for bad data
                    raise ValueError(f"{where}: cannot decode {key!r} image: {err}") from err
                rest = {k: v for k, v in sample.items() if k != key}
                for c, s in domains:
                    img = corrupt(clean, c, s, seed=sample_seed(seed, c, s, shard_index, sample_index))
                    writers[(c, s)].write({**rest, "png": _png_bytes(img)})
                n += 1
            for w in writers.values():
                w.close()
        except BaseException:
            for f in files.values():
                f.close()
            for t in tmps.values():
                if os.path.exists(t):
                    os.remove(t)
            raise
        for f in files.values():
            f.close()
        for d in domains:
            os.replace(tmps[d], finals[d])
            counts[f"{d[0]}/{d[1]}"] += n
        total += n
        if verbose:
            elapsed = time.time() - start
            print(f"[corrupt_shards] {shard_index + 1}/{len(shards)} {name}: {n} samples x "
                  f"{len(domains)} domains ({total} samples, {elapsed:.1f}s)", flush=True)

    manifest = {
        "src": [os.path.abspath(p) for p in shards],
        "seed": int(seed),
        "image_key": image_key,
        "image_format": "png",
        "corruptions": corruptions,
        "severities": severities,
        "shards": [os.path.basename(p) for p in shards],
        "samples_per_domain": counts,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2)
    if verbose:
        print(f"[corrupt_shards] wrote {len(domains)} domains x {total} samples to {out_dir} "
              f"in {time.time() - start:.1f}s", flush=True)
    return manifest
