"""The saved hyper-parameters of the two modules whose checkpoints other code reads without building the
module: ``ImageClassifier`` (TTA sources, REPA teachers and FD networks) and ``ContrastiveModule``
(TTA zero-shot sources, open_clip teachers).

Their options were flat (``model_name``, ``lr``) and are grouped now (``network.name``,
``optim.lr``). The tables here say where each old option went; the modules declare them as their
``moved_options`` (CLI hints, ``load_from_checkpoint``), and ``classifier_hparams`` /
``clip_hparams`` read either layout as the grouped one, so no reader knows the old one. They live in
the core because the readers do (a core module may not import a method package).

Plain stdlib: importable without Lightning, timm or open_clip.
"""

from __future__ import annotations

from typing import Any

from mmalign.specs import OPTIM_MOVED, migrate_flat

#: every option of the older flat ``ImageClassifier`` signature and where it lives now
CLASSIFIER_MOVED = {
    "model_name": "network.name", "pretrained": "network.pretrained", "checkpoint_path": "network.checkpoint_path",
    "model_kwargs": "network.kwargs", "image_size": "transform.image_size", "mean": "transform.mean",
    "std": "transform.std", "augment": "transform.augment", "label_smoothing": "loss.label_smoothing",
    **OPTIM_MOVED,
}

#: every option of the older flat ``ContrastiveModule`` signature and where it lives now
CONTRASTIVE_MOVED = {
    "model_name": "model.name", "model_cfg": "model.cfg", "pretrained": "model.pretrained",
    "init_checkpoint": "model.init_checkpoint", "image_tower_checkpoint": "model.image_tower_checkpoint",
    "image_size": "model.image_size", "augment": "model.augment", "grad_checkpointing": "model.grad_checkpointing",
    "lock_image": "lock.image", "lock_image_unlocked_groups": "lock.image_unlocked_groups",
    "lock_image_freeze_bn_stats": "lock.image_freeze_bn_stats", "lock_text": "lock.text",
    "lock_text_unlocked_layers": "lock.text_unlocked_layers", "text_cache_size": "lock.text_cache_size",
    "loss": "objective.loss", "siglip_exchange": "objective.siglip_exchange",
    "label_smoothing": "objective.label_smoothing", "loss_tile_size": "objective.tile_size",
    "init_logit_scale": "objective.init_logit_scale", "init_logit_bias": "objective.init_logit_bias",
    "max_logit_scale": "objective.max_logit_scale", "accumulate_micro_batches": "objective.accumulate_micro_batches",
    "zeroshot_classes": "eval.zeroshot_classes", "zeroshot_label_field": "eval.label_field",
    "retrieval_chunk_size": "eval.retrieval_chunk_size",
    **OPTIM_MOVED,
}


def classifier_hparams(raw: Any) -> dict[str, Any] | None:
    """An ``ImageClassifier`` checkpoint's ``hyper_parameters`` (flat or grouped) in the grouped layout:
    ``{"network": {"name", "kwargs", "pretrained", "checkpoint_path"}, "num_classes", "transform":
    {"image_size", "mean", "std", "augment"}, "optim", "loss", ...}`` (a group or field the checkpoint
    lacks stays absent); None when ``raw`` names no network (not an ``ImageClassifier``'s)."""
    if not isinstance(raw, dict):
        return None
    hp = migrate_flat(CLASSIFIER_MOVED, raw)
    network = hp.get("network")
    return hp if isinstance(network, dict) and network.get("name") else None


def standalone_classifier_hparams(raw: Any) -> dict[str, Any]:
    """``classifier_hparams`` for a checkpoint whose state dict holds all the weights (adapted or
    exported): no pretrained tag or weights file is read again when it is loaded."""
    hp = classifier_hparams(raw)
    if hp is None:
        raise ValueError("not an ImageClassifier's hyper-parameters (no network.name / model_name).")
    return {**hp, "network": {**hp["network"], "pretrained": False, "checkpoint_path": None}}


def clip_hparams(raw: Any) -> dict[str, Any] | None:
    """A ``ContrastiveModule`` checkpoint's ``hyper_parameters`` (flat or grouped) in the grouped layout:
    ``{"model": {"name", "cfg", "image_size", ...}, "lock", "objective": {"loss", ...}, "optim", "eval",
    ...}``; None when ``raw`` is not a CLIP/SigLIP checkpoint's (it records ``objective.loss``,
    formerly ``loss``)."""
    if not isinstance(raw, dict):
        return None
    hp = migrate_flat(CONTRASTIVE_MOVED, raw)
    objective, model = hp.get("objective"), hp.get("model")
    ok = isinstance(objective, dict) and objective.get("loss") in ("clip", "siglip") and isinstance(model, dict)
    return hp if ok else None
