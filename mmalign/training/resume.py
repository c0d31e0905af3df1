"""Resuming, for the CLI: what ``--ckpt_path`` means, which checkpoint fits, clean parser errors.
Where a run writes is ``rundirs``.

- ``--ckpt_path last`` is the newest checkpoint (by step) of the newest run that has one; a ``fit``
  resumed from a run's own checkpoint continues in that run's folder, dropping the metric rows
  logged after the checkpoint (that work was lost with the process).
- The config's model options win over the checkpoint's hyper-parameters; the differences are
  printed, so an override on a resumed run is visible and applied (see ``ResumeOverrides``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from typing import Any

from .rundirs import _get


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
    from .rundirs import logger_inits, versions

    dirpath = _get(_get(cfg, "checkpoint"), "dirpath")
    if dirpath:
        return None if is_url(str(dirpath)) else newest_checkpoint(str(dirpath))
    for init in logger_inits(_get(cfg, "trainer"))[:1]:
        root = os.path.join(str(init.save_dir), str(_get(init, "name", "")))
        for v in reversed(versions(root)):
            found = newest_checkpoint(os.path.join(root, f"version_{v}", "checkpoints"))
            if found:
                return found
    return None


#: model options (``group.field`` inside a spec) that take a weights file, in the order a plain state dict is
#: best given to them; the flat names are those of modules whose options are not grouped
WEIGHT_OPTIONS = ("network.checkpoint_path", "model.pretrained", "model.init_checkpoint", "source.checkpoint",
                  "checkpoint_path", "pretrained", "init_checkpoint", "source_checkpoint")


def _option(init: Any, dotted: str) -> tuple[bool, Any]:
    """``(present, value)`` of a ``group.field`` (or flat) option in a model's ``init_args``."""
    node = init
    for part in dotted.split("."):
        if node is None:
            return False, None
        try:
            present = part in node
        except TypeError:
            return False, None
        if not present:
            return False, None
        node = _get(node, part)
    return True, node


def read_hparams(path: str, model: Any = None) -> tuple[dict, int]:
    """``(hyper-parameters, global step)`` of a Lightning checkpoint; anything else (a plain state dict,
    a foreign file) is refused in one line that says where such a file belongs."""
    from mmalign.models.weights import load_checkpoint_file

    ck = load_checkpoint_file(path, mmap=True)
    if isinstance(ck, dict) and isinstance(ck.get("state_dict"), dict) and "pytorch-lightning_version" in ck:
        return dict(ck.get("hyper_parameters") or {}), int(ck.get("global_step", -1))
    init = _get(model, "init_args", {}) or {}
    option = next((k for k in WEIGHT_OPTIONS if _option(init, k)[0] and not isinstance(_option(init, k)[1], bool)),
                  None)
    plain = isinstance(ck, dict) and ck and all(hasattr(v, "shape") for v in ck.values())
    what = f"holds a plain state dict of {len(ck)} tensors" if plain else "is not a Lightning checkpoint"
    where = (f"give it to the model instead: --model.init_args.{option}={path}" if option and plain
             else "give the last.ckpt (or a step checkpoint) of an mmalign run")
    raise ValueError(f"ckpt_path '{path}' {what}: --ckpt_path continues or evaluates a run saved by mmalign fit. To "
                     f"start from these weights, {where}.")


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
    model = _get(cfg, "model")
    hp, step = read_hparams(ckpt, model)
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
    return {"path": ckpt, "step": step, "version": version, "subcommand": sub}


def require_weights(config: Any, resuming: bool) -> None:
    """``predict``/``zeroshot`` report a model's outputs as results: refuse to score random weights
    unless a checkpoint or a weights option is given, or ``--allow_random_weights=true``."""
    sub = _get(config, "subcommand")
    cfg = _get(config, sub)
    if resuming or _get(cfg, "ckpt_path") or _get(cfg, "allow_random_weights"):
        return
    init = _get(_get(cfg, "model"), "init_args", {}) or {}
    options = [k for k in WEIGHT_OPTIONS if _option(init, k)[0]]
    if any(_option(init, k)[1] for k in options):
        return
    weights = " or weights (" + ", ".join(f"--model.init_args.{k}" for k in options) + ")" if options else ""
    raise ValueError(f"{sub} would score a randomly initialised model: give a checkpoint (--ckpt_path PATH, or "
                     f"--ckpt_path last){weights}; --allow_random_weights=true runs it anyway (a smoke test).")


def describe_config_error(exc: BaseException, args: list[str]) -> str | None:
    """One line for a config value OmegaConf cannot resolve (an unset ``${oc.env:X}``), naming the
    variable, the key, the config file and the fix; ``None`` for any other error."""
    if not type(exc).__module__.startswith("omegaconf"):
        return None
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = getattr(exc, "full_key", None) or "?"
    var = re.search(r"Environment variable '([^']+)' not found", text)
    needle = f"oc.env:{var.group(1)}" if var else None
    files = [a for i, a in enumerate(args) if i and args[i - 1] in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    found = [f for f in files if needle and os.path.isfile(f) and needle in open(f).read()]
    where = f"{found[0]}: " if found else ""
    if var:
        name = var.group(1)
        return (f"{where}{key}: ${{oc.env:{name}}}: the environment variable {name} is not set. Set it "
                f"(export {name}=...) or give the config a default: ${{oc.env:{name},<default>}}.")
    return f"{where}{key}: the config value cannot be resolved ({text})."


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

    if "." in name:  # already inside a group: a typo of that group's field, not an old flat option
        return None
    cls = _import_class(class_path)
    return None if cls is None else moved_option_hint(cls, name)


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
