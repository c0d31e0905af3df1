"""Run folders and resuming, for the CLI: where a run writes, what ``--ckpt_path`` means, clean errors.

- Loggers that share a save dir and name share one ``version_N`` folder (metrics, events, config
  and checkpoints of a run sit together); ``trainer.default_root_dir`` moves the default ``runs/``.
- ``--ckpt_path last`` is the newest checkpoint (by step) of the newest run that has one; a ``fit``
  resumed from a run's own checkpoint continues in that run's folder, dropping the metric rows
  logged after the checkpoint (that work was lost with the process).
- The config's model options win over the checkpoint's hyper-parameters; the differences are
  printed, so an override on a resumed run is visible and applied (see ``ResumeOverrides``).
- A run that fails before it wrote anything leaves no empty ``version_N`` folder behind.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import glob
import os
import re
import shutil
import sys
from typing import Any

DEFAULT_SAVE_DIR = "runs"
_NEW_RUN_DIRS: list[str] = []  # folders this process planned to create; removed again if it fails early


def _get(ns: Any, key: str, default: Any = None) -> Any:
    if ns is None:
        return default
    try:
        value = ns.get(key, default) if hasattr(ns, "get") else getattr(ns, key, default)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def _logger_inits(trainer_cfg: Any) -> list[Any]:
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


def _versions(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"version_(\d+)", d)))


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if hasattr(v, "as_dict"):
        return _norm(v.as_dict())
    return v


def find_last_checkpoint(cfg: Any) -> str | None:
    """Newest checkpoint in ``checkpoint.dirpath``, else in the newest ``version_N/checkpoints`` of the
    first logger's root."""
    from mmalign.models.weights import is_url

    from .checkpointing import newest_checkpoint

    dirpath = _get(_get(cfg, "checkpoint"), "dirpath")
    if dirpath:
        return None if is_url(str(dirpath)) else newest_checkpoint(str(dirpath))
    for init in _logger_inits(_get(cfg, "trainer"))[:1]:
        root = os.path.join(str(init.save_dir), str(_get(init, "name", "")))
        for v in reversed(_versions(root)):
            found = newest_checkpoint(os.path.join(root, f"version_{v}", "checkpoints"))
            if found:
                return found
    return None


def read_hparams(path: str) -> dict:
    from mmalign.models.weights import load_checkpoint_file

    ck = load_checkpoint_file(path, mmap=True)
    return dict(ck.get("hyper_parameters") or {}) if isinstance(ck, dict) else {}


#: init_args (``group.field`` inside a spec) that fix a network's shapes: evaluation subcommands (zeroshot,
#: test, predict, ...) take these from the checkpoint when the config differs; ``fit`` keeps the config's
#: (a mismatch is then an error). A group named whole (``diffusion``) counts for each of its fields.
ARCHITECTURE_KEYS = frozenset({"model_name", "model_cfg", "model_kwargs", "num_classes", "image_size", "diffusion",
                               "towers", "model.name", "model.cfg", "model.image_size", "network.name",
                               "network.kwargs", "transform.image_size"})


def _leaves(init: dict) -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``: one level, the fields of a spec group."""
    out: dict[str, Any] = {}
    for k, v in init.items():
        if isinstance(v, dict) and k not in ARCHITECTURE_KEYS:
            out.update({f"{k}.{f}": x for f, x in v.items()})
        else:
            out[k] = v
    return out


def _is_architecture(key: str) -> bool:
    return key in ARCHITECTURE_KEYS or key.split(".")[0] in ARCHITECTURE_KEYS


def resolve_resume(config: Any) -> dict | None:
    """Turn the subcommand's ``ckpt_path`` into a concrete file and report what resuming changes."""
    sub = _get(config, "subcommand")
    cfg = _get(config, sub) if sub else None
    ckpt = _get(cfg, "ckpt_path")
    if not ckpt:
        return None
    from mmalign.models.weights import is_url

    from .checkpointing import checkpoint_step

    if ckpt == "last":
        found = find_last_checkpoint(cfg)
        if found is None:
            print("[resume] --ckpt_path last: no checkpoint found under the run folders (or checkpoint.dirpath); "
                  "starting from scratch.", file=sys.stderr)
            cfg.ckpt_path = None
            return None
        cfg.ckpt_path = ckpt = found
        print(f"[resume] --ckpt_path last -> {found}", file=sys.stderr)
    if is_url(str(ckpt)):
        return {"path": ckpt}
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"ckpt_path '{ckpt}' does not exist. Give a checkpoint file, or --ckpt_path last for "
                                "the newest checkpoint of the newest run.")
    hp = read_hparams(ckpt)
    model = _get(cfg, "model")
    class_path = _get(model, "class_path")
    if hp.get("_class_path") and class_path and hp["_class_path"] != class_path:
        raise ValueError(f"ckpt_path '{ckpt}' was trained with model {hp['_class_path']}, but the config builds "
                         f"{class_path}. Use the config the checkpoint was trained with.")
    cls = _import_class(class_path) if class_path else None
    if cls is not None:  # a checkpoint saved before the options were grouped
        from mmalign.specs import migrate_flat

        hp = migrate_flat(cls, hp)
    given, saved = _leaves(_norm(_get(model, "init_args", {})) or {}), _leaves(hp)
    diffs = {k: (saved[k], v) for k, v in given.items() if k in saved and _norm(saved[k]) != v}
    arch = sorted(k for k in diffs if _is_architecture(k)) if sub != "fit" else []
    if arch:  # evaluating a checkpoint: build the network it holds, not the one the config describes
        for k in arch:
            model.init_args[k] = saved[k]
            del diffs[k]
        print(f"[{sub}] architecture taken from the checkpoint ({', '.join(arch)} differ from the config).",
              file=sys.stderr)
    if diffs:
        print("[resume] model options of this run replace the checkpoint's: "
              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diffs.items()), file=sys.stderr)
    parts = os.path.normpath(os.path.abspath(ckpt)).split(os.sep)
    version = None
    if len(parts) >= 3 and parts[-2] == "checkpoints" and (m := re.fullmatch(r"version_(\d+)", parts[-3])):
        version = (os.sep.join(parts[:-3]), int(m.group(1)))
    return {"path": ckpt, "step": checkpoint_step(ckpt), "version": version, "subcommand": sub}


def prepare_run_dirs(config: Any, resume: dict | None) -> None:
    """Point the loggers of one save dir/name at one shared ``version_N`` (the resumed run's for a
    resumed ``fit``), and remember new folders so an early failure can remove them."""
    _NEW_RUN_DIRS.clear()
    sub = _get(config, "subcommand")
    trainer_cfg = _get(_get(config, sub), "trainer") if sub else _get(config, "trainer")
    groups: dict[tuple, list] = {}
    for init in _logger_inits(trainer_cfg):
        if _get(init, "version") is not None:
            continue
        groups.setdefault((str(init.save_dir), str(_get(init, "name", ""))), []).append(init)
    for (save_dir, name), inits in groups.items():
        root = os.path.abspath(os.path.join(save_dir, name))
        version = None
        if resume and resume.get("version") and resume.get("subcommand") == "fit":
            run_root, v = resume["version"]
            if os.path.normpath(run_root) == os.path.normpath(root):
                version = v
                _trim_metrics(os.path.join(root, f"version_{v}", "metrics.csv"), resume.get("step", -1))
        if version is None:
            version = max(_versions(root), default=-1) + 1
        for init in inits:
            init.version = version
        path = os.path.join(root, f"version_{version}")
        if not os.path.exists(path):
            _NEW_RUN_DIRS.append(path)


def _trim_metrics(path: str, step: int) -> None:
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
    """Remove run folders created by this process that hold no checkpoint and no metric row."""
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


_NOISE = ("Given value type:", "Given value:", "Subtypes:", "Errors:", "Does not validate against any of the Union",
          "- Expected a <class 'NoneType'>", "Expected a <class 'NoneType'>")


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested Union error, without the dump of the whole value, plus close matches."""
    lines = [ln.strip() for ln in message.splitlines()]
    kept = [ln.lstrip("- ").strip() for ln in lines if ln and not ln.startswith(_NOISE)]
    text = " ".join(kept)
    m = re.search(r"class_path '([\w.]+)'.*?(?:(?:Option|Key) ['\"]([\w.]+)['\"] is not (?:accepted|expected)"
                  r"|unrecognized arguments: --([\w.]+))", text)  # the latter: a field inside a spec group
    if m:
        name = m.group(2) or m.group(3)
        moved = _moved_option(m.group(1), name)
        hint = None if moved else _close_options(m.group(1), name)
        if moved:
            text += f" This {moved}."
        elif hint:
            text += f" Did you mean {hint}?"
    return text


def _import_class(class_path: str):
    import importlib

    module, _, cls_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError, ValueError):
        return None


def _moved_option(class_path: str, name: str) -> str | None:
    """An option of an older config that now lives in a group (``lr`` -> ``optim.lr``)."""
    from mmalign.specs import moved_option_hint

    cls = _import_class(class_path)
    return None if cls is None else moved_option_hint(cls, name.split(".")[-1])


def _close_options(class_path: str, name: str) -> str:
    import inspect

    cls = _import_class(class_path)
    if cls is None:
        return ""
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is not None:
            for p, param in inspect.signature(init).parameters.items():
                if p not in ("self", "args", "kwargs"):
                    names.append(p)
                    spec = type(param.default)  # a spec group: its fields, as group.field
                    if dataclasses.is_dataclass(spec):
                        names += [f"{p}.{f.name}" for f in dataclasses.fields(spec)]
    head, _, leaf = name.rpartition(".")
    names = ([n for n in names if n.startswith(head + ".")] or names) if head else names  # same group first
    by_leaf = {n.split(".")[-1]: n for n in reversed(names)}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=3)
    return " or ".join(f"'{by_leaf[c]}'" for c in close)
