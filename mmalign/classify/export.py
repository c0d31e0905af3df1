"""The ``ImageClassifier`` checkpoint format, for the methods that read or write one without training
it (test-time adaptation): which hyper-parameters rebuild the network, where its weights live (keys
under ``model.``), and how adapted weights of that network are written back as a loadable checkpoint.

The one place outside ``module.py`` that knows where the weights live; the hyper-parameters (flat or
grouped) are read through the core's ``mmalign.checkpoint_layout``, which TTA sources, REPA teachers
and FD networks share.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: the classifier's network is its ``model`` attribute
PREFIX = "model."


def hparams_of(raw: Any) -> dict[str, Any] | None:
    """The saved hyper-parameters of a loaded checkpoint when it is an ``ImageClassifier``'s (flat or
    grouped), in the grouped layout; else None."""
    from mmalign.checkpoint_layout import classifier_hparams

    hp = classifier_hparams(raw.get("hyper_parameters") if isinstance(raw, dict) else None)
    return hp if hp is not None and "num_classes" in hp else None


def network_from_checkpoint(raw: dict, where: str = "checkpoint") -> tuple[nn.Module, dict[str, Any]]:
    """The timm network of an ``ImageClassifier`` checkpoint (already loaded), with its weights, and
    what a user of the network needs: ``num_classes``, ``model_name``, ``model_kwargs``, ``image_size``,
    ``mean``, ``std`` (the transform's, when the checkpoint records them)."""
    from mmalign.models.timm_models import create_timm_model

    hp = hparams_of(raw)
    if hp is None:
        raise ValueError(f"{where} is not an ImageClassifier checkpoint (no network.name/num_classes hyper-parameters).")
    name, kwargs = hp["network"]["name"], hp["network"].get("kwargs") or {}
    net = create_timm_model(name, hp["num_classes"], False, None, **kwargs)
    sd = {k[len(PREFIX):]: v for k, v in (raw.get("state_dict") or {}).items() if k.startswith(PREFIX)}
    missing, unexpected = sorted(set(net.state_dict()) - set(sd)), sorted(set(sd) - set(net.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{where} does not fit its own hyper-parameters ({name}): "
                         f"{len(missing)} key(s) missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}. "
                         "The file is damaged or was edited; use the checkpoint the run wrote.")
    net.load_state_dict(sd)
    transform = hp.get("transform") or {}
    info = {"model_name": name, "num_classes": hp["num_classes"], "model_kwargs": dict(kwargs),
            **{k: transform[k] for k in ("image_size", "mean", "std") if transform.get(k) is not None}}
    return net, info


def adapted_checkpoint(source_hparams: dict[str, Any], state_dict: dict[str, torch.Tensor],
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ``ImageClassifier``-loadable checkpoint holding ``state_dict`` (the network's own keys) with the
    source's hyper-parameters (either layout; written grouped); nothing is downloaded or read when it is
    loaded (``network.pretrained`` and ``network.checkpoint_path`` are cleared). ``extra`` is stored
    beside (e.g. the TTA method that produced it)."""
    import lightning

    from mmalign.checkpoint_layout import standalone_classifier_hparams

    return {"state_dict": {PREFIX + k: v for k, v in state_dict.items()},
            "hyper_parameters": standalone_classifier_hparams(source_hparams),
            "pytorch-lightning_version": lightning.__version__, **(extra or {})}
