"""A CLIP/SigLIP checkpoint's hyper-parameters, read by code that rebuilds its model without the
LightningModule (TTA sources, teachers, export): one reader for both layouts, so each caller
needs no knowledge of the older flat one."""

from __future__ import annotations

from typing import Any

from mmalign.specs import as_hparams, migrate_flat

from .specs import CONTRASTIVE_MOVED, LOSSES, ContrastiveConfig


class _Layout:
    moved_options = CONTRASTIVE_MOVED


def clip_hparams(raw: Any) -> dict[str, Any] | None:
    """``raw`` (a checkpoint's ``hyper_parameters``, flat or grouped) as the grouped layout with every
    spec complete (``{"model": {"name", "cfg", "image_size", ...}, "lock": ..., "objective": {"loss",
    ...}, "optim": ..., "eval": ..., "compile": ...}`` plus any other saved key); None when ``raw`` is
    not a ``ContrastiveModule``'s (it records ``objective.loss``, formerly ``loss``)."""
    if not isinstance(raw, dict):
        return None
    hp = migrate_flat(_Layout, raw)
    objective = hp.get("objective")
    if not isinstance(objective, dict) or objective.get("loss") not in LOSSES:
        return None
    cfg = ContrastiveConfig.build(hp.get("model"), hp.get("lock"), objective, hp.get("optim"), hp.get("eval"))
    return {**hp, **{k: as_hparams(getattr(cfg, k)) for k in cfg.GROUPS}}
