"""Built-in datasets that mmalign writes itself, so every workflow runs with no download.

``generate_dataset(name, root, **kwargs)`` writes ``root/<split>/shard-XXXXXX.tar`` plus a
``sizes.json`` per split, ``root/classes*.json`` (class names and prompt templates for zero-shot)
and ``root/info.json``. It writes into a temporary sibling folder and renames it into place, so
an interrupted generation never leaves a half dataset that looks complete; the temporary folder a
killed generation leaves behind is removed at the next start (when its process is gone).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

INFO_FILE = "info.json"
OWNER_FILE = ".owner.json"  # host and pid of the process generating into a temporary folder


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


def roots_to_generate(specs: dict, name: str) -> dict[str, set[str]]:
    """Roots of the built-in dataset ``name`` to create: the parents of the configured split folders
    (``{option name: shard spec}``) that do not exist. A missing folder is only generated when it can be
    what the generator writes: its root is named after the dataset (``.../shapes``, ``.../shapes32``)
    and the split is one the generator knows; anything else is a typo and fails instead of silently
    creating a dataset. Returns ``{root: {missing split folders}}``."""
    from ..errors import ShardError

    roots: dict[str, set[str]] = {}
    for what, spec in specs.items():
        for s in [spec] if isinstance(spec, str) else (spec or []):
            if "://" in s or s.startswith("pipe:") or os.path.exists(s):
                continue
            root, split = os.path.split(os.path.normpath(s))
            if not os.path.basename(root).startswith(name):
                raise ShardError(f"{what}: '{s}' does not exist, and generate: {name} only writes into a "
                                 f"folder named after the dataset ('.../{name}/{split}'), so this looks "
                                 f"like a typo in the path. Fix the path, or name the folder '{name}*'.")
            if split not in SPLITS[name]:
                raise ShardError(f"{what}: '{s}' does not exist and '{split}' is not a split of the built-in "
                                 f"'{name}' dataset ({', '.join(SPLITS[name])}). Fix the split name.")
            roots.setdefault(root, set()).add(split)
    return roots


def generate_dataset(name: str, root: str, **kwargs) -> dict:
    """Create dataset ``name`` under ``root`` unless it is already there; returns its info."""
    if name not in GENERATORS:
        raise ValueError(f"unknown built-in dataset '{name}'; choose one of {sorted(GENERATORS)}.")
    root = os.path.normpath(root)
    if is_complete(root):
        info = read_info(root)
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
    try:  # before any work: a read-only data root fails here, in one line
        os.makedirs(parent, exist_ok=True)
        _remove_strays(parent, os.path.basename(root))
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-", dir=parent)
        with open(os.path.join(tmp, OWNER_FILE), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    except OSError as exc:
        raise PermissionError(f"cannot write the built-in '{name}' dataset into '{parent}' ({exc.strerror or exc}). "
                              "Point shards.data_root (or MMALIGN_DATA) at a writable folder, or write it there "
                              f"with: python scripts/generate_data.py {name} --root DIR") from None
    log.warning("generating built-in dataset '%s' into %s (first use; this happens once)", name, root)
    try:
        info = GENERATORS[name](tmp, **kwargs)
        info = {"dataset": name, **info, "generate_kwargs": kwargs}
        os.remove(os.path.join(tmp, OWNER_FILE))
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


def _owner_gone(folder: str) -> bool:
    """Whether a temporary generation folder was left by a process that no longer runs (on this host)."""
    try:
        with open(os.path.join(folder, OWNER_FILE)) as f:
            owner = json.load(f)
    except (OSError, ValueError):  # no owner: an older version's, or one created a moment ago
        return time.time() - os.stat(folder).st_mtime > 60
    if owner.get("host") != socket.gethostname():
        return False  # another node's: it may still be writing (shared file systems)
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return False


def _remove_strays(parent: str, base: str) -> None:
    """Remove the temporary folders (``.<base>-*``) a killed generation left beside ``<base>``."""
    strays = [e.path for e in os.scandir(parent) if e.is_dir() and e.name.startswith(f".{base}-")
              and _owner_gone(e.path)]
    for path in strays:
        shutil.rmtree(path, ignore_errors=True)
    if strays:
        log.warning("removed %d folder(s) an interrupted generation left behind: %s", len(strays),
                    ", ".join(os.path.basename(p) for p in strays))


def read_info(root: str) -> dict:
    """``root/info.json``; a damaged one is named with the way out (regenerate)."""
    path = os.path.join(root, INFO_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        info, problem = None, f"is not readable JSON ({exc})"
    else:
        problem = None if isinstance(info, dict) else f"holds a {type(info).__name__}, not a mapping"
    if problem:
        raise ValueError(f"'{path}' {problem}: the generated dataset at '{root}' is damaged. Delete '{root}' to "
                         "regenerate it.")
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
