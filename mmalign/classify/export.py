"""The ``ImageClassifier`` checkpoint format, for the methods that read or write one without training
it (test-time adaptation): which hyper-parameters rebuild the network, where its weights live (keys
under ``model.``), and how adapted weights of that network are written back as a loadable checkpoint.

The one place outside ``module.py`` that knows this layout: a change to ``ImageClassifier``'s
hyper-parameters or attribute names is mirrored here (old checkpoints are read through
``migrate_flat``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: the classifier's network is its ``model`` attribute
PREFIX = "model."


def hparams_of(raw: Any) -> dict[str, Any] | None:
    """The saved hyper-parameters of a loaded checkpoint when it is an ``ImageClassifier``'s, else None."""
    hp = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    if not isinstance(hp, dict) or "model_name" not in hp or "num_classes" not in hp or "loss" in hp:
        return None
    from mmalign.specs import migrate_flat

    from .module import ImageClassifier

    return migrate_flat(ImageClassifier, dict(hp))


def network_from_checkpoint(raw: dict, where: str = "checkpoint") -> tuple[nn.Module, dict[str, Any]]:
    """The timm network of an ``ImageClassifier`` checkpoint (already loaded), with its weights, and
    what a user of the network needs: ``num_classes``, ``model_name``, ``image_size``, ``mean``, ``std``."""
    from mmalign.models.timm_models import create_timm_model

    hp = hparams_of(raw)
    if hp is None:
        raise ValueError(f"{where} is not an ImageClassifier checkpoint (no model_name/num_classes hyper-parameters).")
    net = create_timm_model(hp["model_name"], hp["num_classes"], False, None, **(hp.get("model_kwargs") or {}))
    sd = {k[len(PREFIX):]: v for k, v in (raw.get("state_dict") or {}).items() if k.startswith(PREFIX)}
    missing, unexpected = sorted(set(net.state_dict()) - set(sd)), sorted(set(sd) - set(net.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{where} does not fit its own hyper-parameters ({hp['model_name']}): "
                         f"{len(missing)} key(s) missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}. "
                         "The file is damaged or was edited; use the checkpoint the run wrote.")
    net.load_state_dict(sd)
    info = {k: hp[k] for k in ("model_name", "num_classes", "model_kwargs", "image_size", "mean", "std") if k in hp}
    return net, info


def adapted_checkpoint(source_hparams: dict[str, Any], state_dict: dict[str, torch.Tensor],
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ``ImageClassifier``-loadable checkpoint holding ``state_dict`` (the network's own keys) with the
    source's hyper-parameters; nothing is downloaded or read when it is loaded (``pretrained`` and
    ``checkpoint_path`` are cleared). ``extra`` is stored beside (e.g. the TTA method that produced it)."""
    import lightning

    hp = dict(source_hparams)
    hp.update(pretrained=False, checkpoint_path=None)
    return {"state_dict": {PREFIX + k: v for k, v in state_dict.items()}, "hyper_parameters": hp,
            "pytorch-lightning_version": lightning.__version__, **(extra or {})}
