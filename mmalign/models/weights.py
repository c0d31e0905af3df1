"""Loading weights from local files, safely, with errors that say exactly which keys do not fit.

``load_checkpoint_file`` is the one way mmalign reads a file it did not just write: with
``weights_only=True`` a crafted file cannot run code, and the refusal says what to do.

Every path that can take pretrained weights (timm, open_clip, teachers) goes through here so
that offline use — a local ``.pt``/``.pth``/``.ckpt``/``.safetensors`` file — behaves the same way
everywhere.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.", "model.")


class UnsafeCheckpointError(ValueError):
    """A file that holds more than tensors and plain containers (pickled code or classes)."""


class UnreadableCheckpointError(ValueError):
    """A file that is not a (complete) PyTorch checkpoint: empty, truncated, or something else entirely."""


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _format(path: str) -> str:
    """What a local file is, from its first bytes: ``zip`` (torch.save since 1.6), ``pickle`` (older
    torch.save), ``safetensors``; anything else is refused here with a message that fits it."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise UnreadableCheckpointError(f"checkpoint '{path}' is empty (0 bytes): it was never completely written or "
                                        "copied. Use another checkpoint (a step checkpoint beside it) or copy it again.")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise UnreadableCheckpointError(f"checkpoint '{path}' is not a PyTorch checkpoint (it starts with {head[:8]!r}, a "
                                    "torch.save file starts like a zip archive). Check the path names a .ckpt/.pt file.")


def _refusal(path: str, exc: BaseException) -> ValueError:
    """One line naming the file and the fix, never torch's advice to load untrusted files unsafely."""
    text = str(exc)
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe:
        return UnsafeCheckpointError(
            f"refusing to load '{path}': it holds the pickled Python object {unsafe.group(1)}, beyond tensors and plain "
            "containers, which could run code when loaded (mmalign loads with weights_only=True). If the file is "
            "yours, re-save its weights as a plain state dict (torch.save(model.state_dict(), path)).")
    if isinstance(exc, EOFError) or "central directory" in text or "zip archive" in text:
        return UnreadableCheckpointError(f"checkpoint '{path}' is truncated or damaged (an incomplete copy or an "
                                         "interrupted write). Use another checkpoint (a step checkpoint beside it) or "
                                         "copy it again.")
    return UnreadableCheckpointError(f"checkpoint '{path}' cannot be read as a PyTorch checkpoint "
                                     f"({type(exc).__name__}); check it is a .ckpt/.pt file written by torch.save.")


def load_checkpoint_file(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the fix
    (``mmap``: map tensors lazily, to read a big checkpoint's metadata cheaply)."""
    path = os.fspath(path)
    if not is_url(path) and not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist. Give a local file (nothing is downloaded).")
    try:
        if is_url(path):
            import fsspec

            with fsspec.open(path, "rb") as f:
                return torch.load(f, map_location=map_location, weights_only=True)
        kind = _format(path)
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(path, device=str(map_location) if isinstance(map_location, str) else "cpu")
        # files of torch < 1.6 (pickle) cannot be memory-mapped; they are read whole
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and kind == "zip")
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        if isinstance(exc, (UnsafeCheckpointError, UnreadableCheckpointError)):
            raise
        raise _refusal(path, exc) from None


def file_digest(path: str) -> str:
    """sha256 of a file, to tie derived artefacts (CAFA statistics) to the checkpoint they came from."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the architecture."""


def read_state_dict(path: str, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from Lightning/timm/DDP containers.

    Args:
        path: Local file (``.safetensors`` or anything ``torch.load`` reads).
        prefix: Keep only keys under this prefix (stripped), e.g. ``model.`` for a Lightning
            checkpoint of a module whose network is ``self.model``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist. Give a local weights file "
                                "(no download happens at run time).")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = load_checkpoint_file(path)  # weights_only=True: a crafted file cannot run code
    for key in _WRAPPER_KEYS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(f"checkpoint '{path}' holds no state dict of tensors.")
    if prefix is not None:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointMismatchError(f"checkpoint '{path}' has no key under prefix '{prefix}'.")
    return sd


def _strip_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    # DDP ("module."), torch.compile ("_orig_mod.") and wrappers ("model.") add prefixes the bare
    # model lacks; strip one only when that makes more keys match.
    for p in _PREFIXES:
        stripped = {k[len(p):] if k.startswith(p) else k: v for k, v in sd.items()}
        if len(model_keys & stripped.keys()) > len(model_keys & sd.keys()):
            sd = stripped
    return sd


def _short(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def load_weights(model: nn.Module, path: str, *, strict: bool = True, drop: Iterable[str] = (),
                 prefix: str | None = None) -> dict[str, list[str]]:
    """Load ``path`` into ``model``; raise one error listing every missing/unexpected/mis-shaped key.

    Args:
        drop: Key prefixes to leave at their fresh initialisation (e.g. a classifier head whose
            class count differs); reported, never an error.
        strict: When False, missing and unexpected keys are reported instead of raised.
    Returns:
        ``{"missing": [...], "unexpected": [...], "dropped": [...]}``.
    """
    own = model.state_dict()
    sd = _strip_prefixes(read_state_dict(path, prefix), set(own))
    dropped = [k for k in sd if any(k.startswith(d) for d in drop)]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    shape_bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and not any(k.startswith(d) for d in drop)]
    unexpected = [k for k in sd if k not in own]
    if shape_bad or (strict and (missing or unexpected)):
        parts = []
        if shape_bad:
            parts.append(f"{len(shape_bad)} shape mismatch(es): {_short(shape_bad, 5)}")
        if strict and missing:
            parts.append(f"{len(missing)} key(s) missing from the checkpoint: {_short(missing)}")
        if strict and unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_short(unexpected)}")
        raise CheckpointMismatchError(f"checkpoint '{path}' does not fit {type(model).__name__}: "
                                      + "; ".join(parts) + ". Check the model name/config matches the checkpoint.")
    model.load_state_dict(sd, strict=False)
    return {"missing": missing, "unexpected": unexpected, "dropped": dropped}


def convert_by_position(source: dict[str, torch.Tensor], model: nn.Module, what: str = "weights") -> dict[str, torch.Tensor]:
    """Rename a state dict of the same architecture written by another library (torchvision's
    MobileNetV2 for timm's ``mobilenetv2_100``): tensors are matched in registration order, which
    both libraries keep, and every shape must agree, so a different architecture fails loudly
    instead of loading garbage."""
    target = model.state_dict()
    if len(source) != len(target):
        raise CheckpointMismatchError(f"{what}: {len(source)} tensors for a model with {len(target)}; not the same "
                                      "architecture.")
    out = {}
    for (src_key, v), (key, ref) in zip(source.items(), target.items()):
        if v.shape != ref.shape:
            raise CheckpointMismatchError(f"{what}: {src_key} {tuple(v.shape)} lands on {key} {tuple(ref.shape)}; not "
                                          "the same architecture (or not the same layer order).")
        out[key] = v
    return out
