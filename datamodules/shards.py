"""Finding, checking and reading webdataset shards.

A shard spec may be a brace pattern (``data/train-{000..009}.tar``), a list of specs, a directory
(every ``*.tar`` in it, sorted; a directory of images instead is read as an image folder, see
``datamodules.folders``), a glob, a ``pipe:`` command or several specs joined with ``::``
(webdataset's convention). Local shards are indexed once at set-up: sample counts, which members
each sample carries and, on request, the small text members (labels). That index is what lets the
stream hand every rank the same number of batches and lets bad configs fail before training.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import braceexpand

from .benchmarks import NPY_SCHEME, iter_npy_samples, npy_size
from .errors import ShardError
from .folders import (FOLDER_SCHEME, folder_index_members, folder_shards, folder_size, is_image_folder,
                      iter_folder_samples, parse_url, scan)
from .tarfast import TarFormatError, iter_members

SIZES_FILE = "sizes.json"  # webdataset/img2dataset-style {shard basename: sample count}


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or ("://" in url and not url.startswith((FOLDER_SCHEME, NPY_SCHEME)))


def expand_shards(spec: str | Sequence[str] | None, what: str = "shards") -> list[str]:
    """Turn a shard spec into an explicit list of shard URLs, checking that local files exist."""
    if spec is None or (isinstance(spec, (list, tuple)) and len(spec) == 0) or spec == "":
        raise ShardError(f"{what}: the shard list is empty. Set it to a directory, a brace pattern "
                         "like 'data/train-{000000..000009}.tar', a list of paths or a 'pipe:' command.")
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    missing: list[str] = []
    for item in specs:
        for part in str(item).split("::"):
            if _is_remote(part):
                urls.append(part)
                continue
            if part.startswith((FOLDER_SCHEME, NPY_SCHEME)):
                urls.append(part)
                continue
            for path in braceexpand.braceexpand(os.path.expanduser(part)):
                if os.path.isdir(path):
                    found = sorted(glob.glob(os.path.join(path, "*.tar")))
                    if not found and is_image_folder(path):  # an ImageFolder / folder of images
                        found = folder_shards(path)
                    if not found:
                        raise ShardError(f"{what}: directory '{path}' holds no *.tar shards and no images.")
                    urls.extend(found)
                elif any(c in path for c in "*?["):
                    found = sorted(glob.glob(path))
                    if not found:
                        missing.append(path)
                    urls.extend(found)
                elif os.path.isfile(path):
                    urls.append(path)
                else:
                    missing.append(path)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ShardError(f"{what}: {len(missing)} shard path(s) do not exist: {shown}. Check the path "
                         "and brace range, or enable generation (generate: shapes|digits) for the "
                         "built-in datasets.")
    if not urls:
        raise ShardError(f"{what}: the spec {spec!r} matched no shards.")
    return urls


def split_key(name: str) -> tuple[str, str]:
    """``dir/abc.001.jpg`` -> (``dir/abc``, ``001.jpg``): webdataset keys end at the first dot of
    the basename, so multi-dot extensions like ``seg.png`` stay with their sample."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, ext.lower()


@dataclass
class ShardIndex:
    url: str
    num_samples: int
    ext_counts: Counter = field(default_factory=Counter)
    texts: dict[str, dict[str, str]] = field(default_factory=dict)  # key -> {ext: text} for read_exts
    complete: int = 0  # samples carrying every required member group
    incomplete_keys: list[str] = field(default_factory=list)  # a few examples of the others


def index_shard(url: str, read_exts: Sequence[str] = (), required: Sequence[Sequence[str]] = ()) -> ShardIndex:
    """Scan a local tar's headers (seeking over payloads) and read the small members in ``read_exts``.

    ``required`` lists member alternatives every usable sample needs (e.g. ``(("jpg", "png"), ("txt",))``);
    the index counts the samples that have them all."""
    if url.startswith(FOLDER_SCHEME):
        return _index_folder(url, read_exts, required)
    if url.startswith(NPY_SCHEME):  # every row is complete: an image and its label
        n = npy_size(url)
        texts = {s["__key__"]: {"cls": s["cls"].decode()} for s in iter_npy_samples(url, [])} \
            if "cls" in read_exts else {}
        return ShardIndex(url, n, Counter({"ppm": n, "cls": n}), texts, n, [])
    keys: dict[str, set[str]] = {}
    texts: dict[str, dict[str, str]] = {}
    try:
        with open(url, "rb") as f:
            want = lambda name: split_key(name)[1] in read_exts  # noqa: E731
            for name, _, data in iter_members(f, want, os.fstat(f.fileno()).st_size):
                if os.path.basename(name).startswith("__"):
                    continue
                key, ext = split_key(name)
                keys.setdefault(key, set()).add(ext)
                if data is not None:
                    texts.setdefault(key, {})[ext] = data.decode("utf-8", "replace")
    except (TarFormatError, OSError, ValueError) as exc:
        raise ShardError(f"shard '{url}' is not a readable tar file ({exc}). Re-create or remove it.") from exc
    counts = Counter(ext for exts in keys.values() for ext in exts)
    bad = [k for k, exts in keys.items() if not all(exts & set(group) for group in required)]
    return ShardIndex(url, len(keys), counts, texts, len(keys) - len(bad), bad[:3])


def _index_folder(url: str, read_exts: Sequence[str], required: Sequence[Sequence[str]]) -> ShardIndex:
    n, counts, labelled = folder_index_members(url)
    texts = {}
    if labelled and "cls" in read_exts:  # labels come from the folder names: read them without the images
        texts = {s["__key__"]: {"cls": s["cls"].decode(), "json": s["json"].decode()} for s in _folder_labels(url)}
    complete = n if all(any(counts.get(e) for e in group) for group in required) else 0
    return ShardIndex(url, n, Counter(counts), texts, complete, [])


def _folder_labels(url: str) -> Iterator[dict]:
    root, lo, hi = parse_url(url)
    listing = scan(root)
    for i in range(lo, hi):
        cls = listing.files[i][1]
        yield {"__key__": listing.key(i), "cls": str(cls).encode(),
               "json": json.dumps({"class": listing.classes[cls]}).encode()}


def write_sizes_file(directory: str, sizes: dict[str, int]) -> str:
    """Write ``sizes.json`` ({shard basename: sample count}) in ``directory``; returns its path."""
    path = os.path.join(directory, SIZES_FILE)
    with open(path, "w") as f:
        json.dump({os.path.basename(k): int(v) for k, v in sorted(sizes.items())}, f, indent=1)
    return path


def write_shard(path: str, samples: Iterable[dict], encoder: bool = True) -> int:
    """Write one shard atomically (``<path>.tmp``, then rename): an interrupted write never leaves a
    shard that looks complete. ``samples`` are dicts with ``__key__`` and ext -> bytes/str/json-able;
    ``encoder=False`` writes bytes as given. Returns the sample count."""
    from webdataset import TarWriter

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp, n = path + ".tmp", 0
    try:
        with open(tmp, "wb") as f, TarWriter(f, encoder=encoder, mtime=0.0) as w:
            for sample in samples:
                w.write({k: v for k, v in sample.items() if k != "__url__"})
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def write_shards(out_dir: str, samples: Iterable[dict], shard_size: int, prefix: str = "shard") -> dict[str, int]:
    """Write ``samples`` as ``out_dir/<prefix>-NNNNNN.tar`` shards of ``shard_size`` (webdataset's
    ``ShardWriter``) plus their ``sizes.json``; returns {shard basename: count}."""
    from webdataset import ShardWriter

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    os.makedirs(out_dir, exist_ok=True)
    sizes: dict[str, int] = {}
    keys: dict[str, set[str]] = {}
    with ShardWriter(os.path.join(out_dir, f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0.0) as w:
        for sample in samples:
            check_key(sample["__key__"])
            w.write(sample)
            name = os.path.basename(w.fname)
            mine = keys.setdefault(name, set())
            if sample["__key__"] in mine:  # a reader would join the two into one sample
                raise ValueError(f"two samples share the key {sample['__key__']!r} in shard {name}: they would be "
                                 "read as one. Give every sample its own key.")
            mine.add(sample["__key__"])
            sizes[name] = sizes.get(name, 0) + 1
    write_sizes_file(out_dir, sizes)
    return sizes


def check_key(key: str) -> None:
    """A webdataset key ends at the first dot of a member's file name: a key with a dot in its last part
    (``a.b``) would be read back as key ``a`` with members ``b.png``..."""
    if not key or "." in os.path.basename(key) or key.startswith("__"):
        raise ValueError(f"sample key {key!r} cannot be written: a key must be non-empty, must not start with '__' "
                         "and must have no '.' in its last part (readers cut the key at the first dot).")


def read_sizes_file(urls: Sequence[str]) -> dict[str, int]:
    """Sample counts from ``sizes.json`` files next to the shards, when present."""
    sizes: dict[str, int] = {u: folder_size(u) for u in urls if u.startswith(FOLDER_SCHEME)}
    sizes.update({u: npy_size(u) for u in urls if u.startswith(NPY_SCHEME)})
    for directory in {os.path.dirname(u) for u in urls if not _is_remote(u) and not u.startswith((FOLDER_SCHEME,
                                                                                                     NPY_SCHEME))}:
        path = os.path.join(directory, SIZES_FILE)
        if os.path.isfile(path):
            sizes.update({os.path.join(directory, name): n for name, n in _read_sizes(path).items()})
    return sizes


def _read_sizes(path: str) -> dict[str, int]:
    fix = ("it maps shard file names to sample counts, e.g. {\"shard-000000.tar\": 1000}. Fix it, or delete it (local "
           "shards are then counted by the index)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ShardError(f"'{path}' is not a readable sizes file ({exc}); {fix}.") from None
    if not isinstance(data, dict):
        raise ShardError(f"'{path}' holds a {type(data).__name__}, not a mapping; {fix}.")
    bad = [(k, v) for k, v in data.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise ShardError(f"'{path}': the count of {bad[0][0]!r} is {bad[0][1]!r}, not a whole number >= 0; {fix}.")
    return data


def iter_tar_samples(url: str, errors: list[str], start: int = 0) -> Iterator[dict]:
    """Yield samples ``{"__key__", "__url__", ext: bytes, ...}`` from one shard, streaming.

    ``start`` rotates the shard: samples ``start..end`` first, then ``0..start-1`` (a second read that
    stops there). A reader whose epoch quota ends inside a big shard thus reaches a different part of
    it each epoch instead of never seeing its tail; skipped payloads are not read into memory.

    A truncated or unreadable tar ends that shard early: the failure is appended to ``errors`` (the
    caller counts it) instead of killing the run, because one bad file in a 10k-shard set must not
    cost a day of training.
    """
    if url.startswith(FOLDER_SCHEME):
        yield from iter_folder_samples(url, errors, start)
        return
    if url.startswith(NPY_SCHEME):
        yield from iter_npy_samples(url, errors, start)
        return
    yield from _read_tar(url, errors, skip=start)
    if start > 0:
        again: list[str] = []  # a truncation shows up in both reads: report it once
        yield from _read_tar(url, again, stop=start)
        if again and not errors:
            errors.extend(again)


def _read_tar(url: str, errors: list[str], skip: int = 0, stop: int | None = None) -> Iterator[dict]:
    from webdataset.gopen import gopen

    current: dict | None = None
    index = -1  # position of the current sample in the shard
    state = {"key": None, "index": -1}

    def want(name: str) -> bool:  # read a payload only for samples at positions >= skip
        key = split_key(name)[0]
        if key != state["key"]:
            state["key"], state["index"] = key, state["index"] + 1
        return state["index"] >= skip and (stop is None or state["index"] < stop)

    stream = None
    try:
        local = not _is_remote(url) and url.endswith(".tar")
        stream = open(url, "rb") if local else _Pipe(url) if url.startswith("pipe:") else gopen(url, "rb")
        size = os.fstat(stream.fileno()).st_size if local else None
        members = iter_members(stream, want, size) if local or not url.endswith(("gz", "tgz")) else \
            _tarfile_members(stream)
        for name, _, data in members:
            key, ext = split_key(name)
            if os.path.basename(key).startswith("__"):
                continue
            if current is None or current["__key__"] != key:
                if current is not None and index >= skip:
                    yield current
                index += 1
                if stop is not None and index >= stop:
                    current = None
                    break
                current = {"__key__": key, "__url__": url}
            if index >= skip and data is not None:
                current[ext] = data
        if isinstance(stream, _Pipe):
            stream.finish()
    except PipeCommandError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        if isinstance(stream, _Pipe):
            stream.finish()  # a command that failed is named as such, not as a truncated tar
        errors.append(f"{url}: unreadable after key {current['__key__'] if current else '-'} ({exc})")
        current = None  # a sample cut by the truncation is incomplete; drop it
    finally:
        if stream is not None:  # tarfile does not close a file object it was handed
            stream.close()
    if current is not None and index >= skip:
        yield current


class PipeCommandError(ShardError):
    """A ``pipe:`` shard command that failed: never skipped, since it would fail the same way every pass."""


class _Pipe:
    """The standard output of a ``pipe:`` spec's shell command, read like a file. A command that exits
    with an error raises ``PipeCommandError`` naming the command and its exit status (its own error
    output goes to this process's stderr, just above)."""

    def __init__(self, url: str) -> None:
        import subprocess

        self.url, self.command = url, url[len("pipe:"):]
        self.proc = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 16)

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def finish(self) -> None:
        """The reader is done: drain the rest (tar padding) and check how the command ended."""
        while self.proc.stdout.read(1 << 16):
            pass
        status = self.proc.wait()
        if status != 0:
            raise PipeCommandError(f"shard '{self.url}': the shell command {self.command!r} exited with status "
                                   f"{status} (its error output, if any, is above). Fix the command, or remove "
                                   "the shard from the spec.")

    def close(self) -> None:
        self.proc.stdout.close()
        if self.proc.poll() is None:  # stopped early (rotation, or the consumer stopped): no error to report
            self.proc.kill()
        self.proc.wait()


def _tarfile_members(stream) -> Iterator[tuple[str, int, bytes]]:
    """Compressed shards (``.tar.gz``): the standard library reads them."""
    with tarfile.open(fileobj=stream, mode="r|*") as tf:
        for member in tf:
            if member.isreg():
                yield member.name, member.size, tf.extractfile(member).read()


#: shard lists up to this long keep their entries in a checkpoint (to name what changed); longer ones a digest
FINGERPRINT_ENTRIES = 4096


def shard_fingerprint(urls: Sequence[str], sizes: dict[str, int]) -> dict:
    """Names, byte sizes, modification times and sample counts of a shard list, and their digest: what a
    checkpoint compares to notice a shard added, removed, renamed or rewritten (cheaply: no shard is read).
    Names are relative to the shards' common folder, so a dataset moved as a whole (with its times, e.g.
    ``cp -p``/``rsync -a``) still matches; a virtual folder shard's "size" is a checksum of its file list."""
    import hashlib
    import zlib

    local = [u for u in urls if not _is_remote(u) and not u.startswith((FOLDER_SCHEME, NPY_SCHEME))]
    common = os.path.commonpath([os.path.dirname(os.path.abspath(u)) for u in local]) if local else ""
    entries = []
    for url in urls:
        count = int(sizes.get(url, -1))
        if url.startswith(FOLDER_SCHEME):
            root, lo, hi = parse_url(url)
            listing = json.dumps(scan(root).files[lo:hi]).encode()
            entries.append([f"{os.path.basename(root)}#{lo}-{hi}", zlib.crc32(listing), 0, count])
        elif _is_remote(url) or url.startswith(NPY_SCHEME):
            entries.append([url, -1, -1, count])
        else:
            st = os.stat(url)
            entries.append([os.path.relpath(os.path.abspath(url), common), st.st_size, st.st_mtime_ns, count])
    digest = hashlib.sha1(json.dumps(entries).encode()).hexdigest()
    kept = entries if len(entries) <= FINGERPRINT_ENTRIES else None
    return {"count": len(entries), "digest": digest, "entries": kept}
