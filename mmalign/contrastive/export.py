"""The CLIP/SigLIP (``ContrastiveModule``) checkpoint format, for the methods that read or write one
without training it (test-time adaptation of a zero-shot classifier): which hyper-parameters rebuild
the open_clip model, where its weights live (keys under ``model.``), and how adapted weights are written
back as a checkpoint ``ContrastiveModule`` loads.

The one place outside ``module.py`` that knows this layout: a change to ``ContrastiveModule``'s
hyper-parameters or attribute names is mirrored here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: the module's open_clip model is its ``model`` attribute
PREFIX = "model."


def hparams_of(raw: Any) -> dict[str, Any] | None:
    """The saved hyper-parameters of a loaded checkpoint when it is a CLIP/SigLIP module's (flat or
    grouped), in the grouped layout; else None."""
    from mmalign.checkpoint_layout import clip_hparams

    hp = clip_hparams(raw.get("hyper_parameters") if isinstance(raw, dict) else None)
    return None if hp is None else {k: v for k, v in hp.items() if not k.startswith("_")}


def model_from_checkpoint(raw: dict, where: str = "checkpoint") -> tuple[nn.Module, dict[str, Any]]:
    """The open_clip model of a CLIP/SigLIP checkpoint (already loaded) with its weights, in eval mode,
    and ``model_name``, ``model_cfg``, ``image_size`` from its hyper-parameters (``hparams``: all of them)."""
    from mmalign.models.open_clip_models import create_open_clip

    hp = hparams_of(raw)
    if hp is None:
        raise ValueError(f"{where} is not a CLIP/SigLIP checkpoint (its hyper-parameters name no loss clip/siglip).")
    m = hp["model"]
    clip = create_open_clip(m["name"], m.get("cfg"))
    sd = {k[len(PREFIX):]: v for k, v in (raw.get("state_dict") or {}).items() if k.startswith(PREFIX)}
    missing, unexpected = sorted(set(clip.state_dict()) - set(sd)), sorted(set(sd) - set(clip.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{where} does not fit its own hyper-parameters ({m['name']}): "
                         f"{len(missing)} key(s) missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}.")
    clip.load_state_dict(sd)
    return clip.eval(), {"model_name": m["name"], "model_cfg": m.get("cfg"), "image_size": m.get("image_size"),
                         "hparams": hp}


def adapted_checkpoint(source_hparams: dict[str, Any], state_dict: dict[str, torch.Tensor],
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint ``ContrastiveModule`` (``CLIP``/``SigLIP``) loads, holding the open_clip model's
    ``state_dict`` (its own keys) with the source's hyper-parameters; ``extra`` is stored beside."""
    return {"state_dict": {PREFIX + k: v for k, v in state_dict.items()}, "hyper_parameters": dict(source_hparams),
            **(extra or {})}
