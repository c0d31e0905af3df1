"""Built-in datasets that mmalign writes itself, so every workflow runs with no download.

``generate_dataset(name, root, **kwargs)`` writes ``root/<split>/shard-XXXXXX.tar`` plus a
``sizes.json`` per split, ``root/classes*.json`` (class names and prompt templates for zero-shot)
and ``root/info.json``. It writes into a temporary sibling folder and renames it into place, so
an interrupted generation never leaves a half dataset that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

INFO_FILE = "info.json"


def _shapes(root: str, **kw):
    from .shapes import generate

    return generate(root, **kw)


def _digits(root: str, **kw):
    from .digits import generate

    return generate(root, **kw)


def _spoken(root: str, **kw):
    from .spoken import generate

    return generate(root, **kw)


GENERATORS: dict[str, Callable[..., dict]] = {"shapes": _shapes, "digits": _digits, "spoken": _spoken}


def generator_function(name: str) -> Callable[..., dict]:
    """The generator itself (its signature lists the options ``generate.kwargs`` may set)."""
    import importlib

    return importlib.import_module(f"{__name__}.{name}").generate
#: the split folders each generator writes (``spoken`` writes ``val`` and ``test_seen_voice`` only on request)
SPLITS: dict[str, tuple[str, ...]] = {"shapes": ("train", "val", "test", "heldout"), "digits": ("train", "val", "test"),
                                      "spoken": ("train", "test", "test_seen_voice", "val")}


def write_split(out_dir: str, samples: Iterable[dict], shard_size: int) -> int:
    """Write one split's ``shard-NNNNNN.tar`` files and ``sizes.json``; returns the sample count."""
    from ..shards import write_shards

    return sum(write_shards(out_dir, samples, shard_size).values())


def is_complete(root: str) -> bool:
    return os.path.isfile(os.path.join(root, INFO_FILE))


def generate_dataset(name: str, root: str, **kwargs) -> dict:
    """Create dataset ``name`` under ``root`` unless it is already there; returns its info."""
    if name not in GENERATORS:
        raise ValueError(f"unknown built-in dataset '{name}'; choose one of {sorted(GENERATORS)}.")
    root = os.path.normpath(root)
    if is_complete(root):
        with open(os.path.join(root, INFO_FILE)) as f:
            info = json.load(f)
        if info.get("dataset") != name:
            raise ValueError(f"'{root}' already holds dataset '{info.get('dataset')}', not '{name}'.")
        differ = _differences(info, kwargs)
        if differ:
            log.warning("'%s' was generated earlier with %s; it is used as it is. Delete the folder to regenerate it "
                        "with these settings.", root, ", ".join(differ))
        return info
    if os.path.exists(root) and os.listdir(root):
        raise FileExistsError(f"'{root}' exists but holds no complete generated dataset ({INFO_FILE} missing). "
                              "Remove it (an earlier generation was interrupted) or point the shards elsewhere.")
    parent = os.path.dirname(root) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-", dir=parent)
    log.warning("generating built-in dataset '%s' into %s (first use; this happens once)", name, root)
    try:
        info = GENERATORS[name](tmp, **kwargs)
        info = {"dataset": name, **info, "generate_kwargs": kwargs}
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(info, f, indent=1)
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        try:
            os.rename(tmp, root)
        except OSError:
            if not is_complete(root):  # another node won the race only if it finished
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    log.warning("generated '%s' at %s: %s", name, root, {k: v for k, v in info.items() if k == "splits"})
    return info


def _differences(info: dict, kwargs: dict) -> list[str]:
    """``key=old (asked: new)`` for each generation setting an existing dataset was not made with: from
    the settings it recorded, or for older datasets from its split sizes (``num_<split>``)."""
    recorded = info.get("generate_kwargs") or {}
    out = []
    for key, want in kwargs.items():
        if key in recorded:
            have = recorded[key]
        elif key.startswith("num_") and key[4:] in info.get("splits", {}):
            have = info["splits"][key[4:]]
        elif key.startswith("num_") and want:  # a split asked for that the dataset does not have
            have = 0
        else:
            continue
        if have != want:
            out.append(f"{key}={have} (asked: {want})")
    return out


def encode_image(img, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format=fmt.upper())
    return buf.getvalue()


def write_class_spec(root: str, name: str, classnames: list[str], templates: list[str]) -> None:
    with open(os.path.join(root, name), "w") as f:
        json.dump({"classnames": classnames, "templates": templates}, f, indent=1)


def chunks(it: Iterable, n: int) -> Iterator[list]:
    buf: list = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
