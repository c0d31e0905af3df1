"""An ``ImageClassifier`` checkpoint's hyper-parameters, read by code that rebuilds its network
without the LightningModule (TTA sources, REPA teachers): one reader for both layouts, so each
caller needs no knowledge of the older flat one."""

from __future__ import annotations

from typing import Any

from mmalign.specs import OptimSpec, as_hparams, coerce, migrate_flat, need

from .specs import CLASSIFIER_MOVED, CLASSIFIER_OPTIM, GROUPS


class _Layout:
    moved_options = CLASSIFIER_MOVED


def classifier_hparams(raw: Any) -> dict[str, Any] | None:
    """An ``ImageClassifier`` checkpoint's ``hyper_parameters`` (flat or grouped) as the grouped layout
    with every spec complete (``{"network": {"name", "kwargs", ...}, "num_classes", "transform":
    {"image_size", "mean", "std", ...}, "optim", "loss", ...}`` plus any other saved key); None when
    ``raw`` names no timm network (not an ``ImageClassifier``'s). For code that rebuilds the network
    without the LightningModule (TTA sources, REPA teachers)."""
    if not isinstance(raw, dict):
        return None
    hp = migrate_flat(_Layout, raw)
    if not isinstance(hp.get("network"), dict) or not hp["network"].get("name"):
        return None
    out = {**hp, **{k: as_hparams(coerce(hp.get(k), cls, k)) for k, cls in GROUPS.items()}}
    out["optim"] = as_hparams(coerce(hp.get("optim"), OptimSpec, "optim", base=CLASSIFIER_OPTIM))
    return out


def standalone_hparams(raw: Any) -> dict[str, Any]:
    """``classifier_hparams`` for a checkpoint whose state dict holds all the weights (adapted or
    exported): no pretrained tag or weights file is read again when it is loaded."""
    hp = classifier_hparams(raw)
    need(hp is not None, "not an ImageClassifier's hyper-parameters (no network.name / model_name).")
    hp["network"] = {**hp["network"], "pretrained": False, "checkpoint_path": None}
    return hp
