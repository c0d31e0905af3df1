"""Run folders, for the CLI: claimed atomically, checked before the first step, one record per segment.

- Loggers that share a save dir and name share one ``version_N`` folder (metrics, events, config
  and checkpoints of a run sit together); ``trainer.default_root_dir`` moves the default ``runs/``.
- A new run *claims* its folder with ``os.mkdir`` of the next free number, retried on a clash: two
  runs started together in one root never share a ``version_N``. DDP processes that Lightning
  launches read rank 0's claim from the environment instead of claiming their own.
- Every output location (run folders, ``checkpoint.dirpath``, a subcommand's result folder) is
  checked before any work: a checkpoint folder that cannot be written is found at start, not after
  training. Remote (fsspec) checkpoint folders are checked only for a known protocol and its package.
- A ``fit`` resumed into an existing folder is a new *segment*: its config and hyper-parameters go to
  ``config.segmentN.yaml`` / ``hparams.segmentN.yaml``; the first segment's files are never replaced.
- A run that fails before it wrote anything leaves no empty ``version_N`` folder behind.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
from typing import Any

from .outputs import OutputLocationError, check_output_dir

DEFAULT_SAVE_DIR = "runs"
_VERSION_ENV = "MMALIGN_RUN_VERSIONS"  # {run root: version} claimed by rank 0, inherited by launched ranks
_NEW_RUN_DIRS: list[str] = []  # folders this process claimed; removed again if it fails early
_SEGMENTS: dict[str, int] = {}  # run folder -> segment index of this process (0: the first)


def _get(ns: Any, key: str, default: Any = None) -> Any:
    if ns is None:
        return default
    try:
        value = ns.get(key, default) if hasattr(ns, "get") else getattr(ns, key, default)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def logger_inits(trainer_cfg: Any) -> list[Any]:
    """The ``init_args`` of configured loggers, with the default save dir moved to ``default_root_dir``."""
    loggers = _get(trainer_cfg, "logger")
    if not isinstance(loggers, list):
        return []
    root = _get(trainer_cfg, "default_root_dir", DEFAULT_SAVE_DIR)
    inits = []
    for lg in loggers:
        init = getattr(lg, "init_args", None)
        if init is None or "save_dir" not in init:
            continue
        if str(init.save_dir) == DEFAULT_SAVE_DIR and str(root) != DEFAULT_SAVE_DIR:
            init.save_dir = str(root)
        inits.append(init)
    return inits


def versions(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"version_(\d+)", d)))


def claim_version(root: str) -> int:
    """Create ``root/version_N`` for the lowest free N above the existing ones; atomic across processes
    (``mkdir`` fails for all but one of the runs that pick the same N, and the others pick again)."""
    os.makedirs(root, exist_ok=True)
    while True:
        v = max(versions(root), default=-1) + 1
        try:
            os.mkdir(os.path.join(root, f"version_{v}"))
            return v
        except FileExistsError:
            continue


def _rank() -> int:
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def prepare_run_dirs(config: Any, resume: dict | None, outputs: dict[str, str] | None = None) -> None:
    """Check every output location, then give the loggers of one save dir/name one claimed
    ``version_N`` (the resumed run's own for a resumed ``fit``). ``outputs``: the subcommand's own
    result options (``{option: what goes there}``)."""
    _NEW_RUN_DIRS.clear()
    sub = _get(config, "subcommand")
    cfg = _get(config, sub) if sub else config
    trainer_cfg = _get(cfg, "trainer")
    root_option = "trainer.default_root_dir"
    check_output_dir(str(_get(trainer_cfg, "default_root_dir", DEFAULT_SAVE_DIR)),
                     "run folder (logs, checkpoints, results)", root_option, create=False)
    for option, what in (outputs or {}).items():
        if _get(cfg, option):
            check_output_dir(str(_get(cfg, option)), what, f"--{option}", create=False)
    if sub == "fit":
        check_checkpoint_dir(_get(_get(cfg, "checkpoint"), "dirpath"))
    groups: dict[tuple, list] = {}
    for init in logger_inits(trainer_cfg):
        if _get(init, "version") is not None:
            continue
        groups.setdefault((str(init.save_dir), str(_get(init, "name", ""))), []).append(init)
    claimed = json.loads(os.environ.get(_VERSION_ENV, "{}")) if _rank() else {}
    for (save_dir, name), inits in groups.items():
        root = os.path.abspath(os.path.join(save_dir, name))
        check_output_dir(root, "run folder (logs, checkpoints, results)",
                         root_option if save_dir == str(_get(trainer_cfg, "default_root_dir", DEFAULT_SAVE_DIR))
                         else "the logger's save_dir", create=False)
        version = _resumed_version(root, resume)
        if version is not None:
            _SEGMENTS[os.path.join(root, f"version_{version}")] = next_segment(os.path.join(root, f"version_{version}"))
        elif _rank():  # a launched DDP process: rank 0 claimed the folder (Lightning only logs on rank 0)
            version = int(claimed.get(root, max(versions(root), default=0)))
        else:
            version = claim_version(root)
            _NEW_RUN_DIRS.append(os.path.join(root, f"version_{version}"))
            claimed[root] = version
        for init in inits:
            init.version = version
    if not _rank() and claimed:
        os.environ[_VERSION_ENV] = json.dumps(claimed)


def _resumed_version(root: str, resume: dict | None) -> int | None:
    if not (resume and resume.get("version") and resume.get("subcommand") == "fit"):
        return None
    run_root, v = resume["version"]
    if os.path.normpath(run_root) != os.path.normpath(root):
        return None
    trim_metrics(os.path.join(root, f"version_{v}", "metrics.csv"), resume.get("step", -1))
    return v


def check_checkpoint_dir(dirpath: Any) -> None:
    """A local ``checkpoint.dirpath`` must be a writable folder; a URL needs a protocol fsspec knows
    and its package (writing to the store is not tried: it would cost a request per run)."""
    if not dirpath:
        return
    from mmalign.models.weights import is_url

    dirpath = str(dirpath)
    if not is_url(dirpath):
        check_output_dir(dirpath.removeprefix("file://"), "checkpoint", "checkpoint.dirpath", create=False)
        return
    import fsspec

    protocol = dirpath.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise OutputLocationError(f"the checkpoint location {dirpath} cannot be written: {exc}. Set checkpoint.dirpath "
                                  "to a local folder, or install the fsspec package for that protocol.") from None


def segment_file(folder: str, base: str) -> str:
    """``base`` (``config.yaml``) for a run's first segment, ``config.segmentN.yaml`` for the N-th resume."""
    n = _SEGMENTS.get(os.path.abspath(folder))
    if n is None:
        n = next_segment(folder) if os.path.exists(os.path.join(folder, base)) else 0
    stem, ext = os.path.splitext(base)
    return base if n == 0 else f"{stem}.segment{n}{ext}"


def next_segment(folder: str) -> int:
    """The index of a new segment of the run in ``folder``: one past the records already there."""
    found = [-1]
    for path in glob.glob(os.path.join(glob.escape(folder), "*.yaml")):
        m = re.fullmatch(r"(?:config|hparams)(?:\.segment(\d+))?\.yaml", os.path.basename(path))
        if m:
            found.append(int(m.group(1) or 0))
    return max(found) + 1


def trim_metrics(path: str, step: int) -> None:
    """Drop the metric rows a killed run logged after the checkpoint it is resumed from."""
    if step < 0 or not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if not r.get("step") or int(float(r["step"])) <= step]
    if len(kept) == len(rows):
        return
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)


def remove_failed_run_dirs() -> None:
    """Remove run folders claimed by this process that hold no checkpoint and no metric row."""
    for path in _NEW_RUN_DIRS:
        if not os.path.isdir(path):
            continue
        if glob.glob(os.path.join(glob.escape(path), "**", "*.ckpt"), recursive=True):
            continue
        metrics = os.path.join(path, "metrics.csv")
        if os.path.isfile(metrics) and sum(1 for _ in open(metrics)) > 1:
            continue
        shutil.rmtree(path, ignore_errors=True)
    _NEW_RUN_DIRS.clear()
