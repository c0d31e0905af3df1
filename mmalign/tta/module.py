"""``TTAModel``: the ``model`` of an ``adapt`` config — the source classifier plus the settings of
the adaptation methods. The adaptation itself runs in ``mmalign.tta.adapt_command``."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch

from datamodules.base import Preprocess
from datamodules.transforms import default_image_transform

from .methods import TTAConfig, build_method
from .stream import check_methods


class TTAModel(pl.LightningModule):
    """A source classifier to adapt at test time.

    Args:
        source_checkpoint: ``ImageClassifier`` Lightning checkpoint, or weights for ``model_name``.
            Never written to. ``null`` = random weights (smoke tests only).
        model_name: timm model name, when the checkpoint is not an ImageClassifier checkpoint.
        num_classes: Class count, idem.
        model_kwargs: Extra timm constructor arguments, idem.
        image_size: Eval-transform side (default: the checkpoint's, else 32).
        mean: Normalisation mean (default: the checkpoint's, else timm's ImageNet mean).
        std: Normalisation std (default: the checkpoint's, else timm's ImageNet std).
        methods: Methods compared, from ``source``, ``norm``, ``tent``, ``tent_filter``, ``cafa``.
        lr: Adam learning rate of the adapting methods (TENT: 1e-3 at batch 200).
        adapt_norms: Norm layers whose affine parameters adapt: ``all``, ``batchnorm``,
            ``layernorm``, ``groupnorm`` or a list of module-name regexes. BatchNorm always
            normalises with test-batch statistics in the adapting methods and ``norm``.
        filter_alpha: Weight of the mean-prediction entropy (diversity) term of ``tent_filter``.
        filter_diversity: Whose mean prediction that term uses: ``kept`` (the filtered samples) or
            ``batch`` (the whole batch, as the public reimplementation does).
        small_batch: Batches of one image with BatchNorm: ``error`` (default) or ``source_stats``
            (predict with the source running statistics, no update).
        cafa_stats: Source statistics file; default ``<checkpoint stem>.cafa_stats.pt`` next to the
            checkpoint, computed from ``data.init_args.shards.train`` when missing.
        cafa_covariance: ``auto`` (class-wise unless C*d*d > 5e7), ``shared`` or ``classwise``.
        cafa_shrinkage: Shrinkage towards a scaled identity, in [0, 1].
        cafa_denominator: ``all`` (sum over every class) or ``others`` (c != y); unverified in
            the paper, "all" by default.
        zeroshot_classes: With a CLIP/SigLIP ``source_checkpoint``: the class-spec file whose
            prompts build the zero-shot head (class order = label order). Adapt its LayerNorms
            with ``adapt_norms: layernorm``.
    """

    def __init__(
        self,
        source_checkpoint: str | None = None,
        model_name: str | None = None,
        num_classes: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        methods: list[str] = ["source", "norm", "tent", "tent_filter", "cafa"],  # noqa: B006 (jsonargparse)
        lr: float = 1e-3,
        adapt_norms: str | list[str] = "all",
        filter_alpha: float = 0.5,
        filter_diversity: str = "kept",
        small_batch: str = "error",
        cafa_stats: str | None = None,
        cafa_covariance: str = "auto",
        cafa_shrinkage: float = 0.1,
        cafa_denominator: str = "all",
        zeroshot_classes: str | None = None,
    ) -> None:
        super().__init__()
        check_methods(methods)
        self.save_hyperparameters()
        self.cfg = TTAConfig(lr=lr, adapt_norms=adapt_norms, filter_alpha=filter_alpha, filter_diversity=filter_diversity,
                             cafa_denominator=cafa_denominator, small_batch=small_batch)
        from .source import load_source

        self.source, self.source_hparams = load_source(source_checkpoint, model_name, num_classes, model_kwargs,
                                                       zeroshot_classes)
        self.source.eval()
        self.num_classes = int(self.source_hparams["num_classes"])
        hp = self.source_hparams.get("transform") or {}  # an ImageClassifier checkpoint's (grouped) transform
        self._transform = (image_size or hp.get("image_size", 32), tuple(mean or hp.get("mean", (0.485, 0.456, 0.406))),
                           tuple(std or hp.get("std", (0.229, 0.224, 0.225))))

    @property
    def preprocess(self) -> Preprocess:
        if "eval_transform" in self.source_hparams:  # open_clip: the model's own preprocessing
            t = self.source_hparams["eval_transform"]
            return Preprocess(train_transform=t, eval_transform=t)
        size, mean, std = self._transform
        t = default_image_transform(size, False, mean, std)
        return Preprocess(train_transform=t, eval_transform=t)  # source data for CAFA stats: no augmentation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.source(images)

    def stats_path(self, out_dir: str) -> str:
        from .cafa_stats import stats_path_for

        if self.hparams.cafa_stats:
            return self.hparams.cafa_stats
        if self.hparams.source_checkpoint:
            return stats_path_for(self.hparams.source_checkpoint)
        return os.path.join(out_dir, "cafa_stats.pt")

    def build_methods(self, stats=None) -> dict:
        return {name: build_method(name, self.source, self.cfg, stats) for name in self.hparams.methods}

    def adapted_checkpoint(self, method) -> dict:
        """An ``ImageClassifier``-loadable checkpoint of a method's adapted weights."""
        import lightning

        if self.source_hparams.get("kind") == "open_clip_zeroshot":  # loads with ContrastiveModule
            sd = {"model." + k.removeprefix("backbone.clip."): v for k, v in method.adapted_state_dict().items()
                  if k.startswith("backbone.clip.")}
            hp = dict(self.source_hparams["contrastive_hparams"])
            return {"state_dict": sd, "hyper_parameters": hp, "tta": {"method": method.name,
                    "updates": method.updates, "source_checkpoint": self.hparams.source_checkpoint}}
        from mmalign.checkpoint_layout import standalone_classifier_hparams

        sd = {"model." + k.removeprefix("net."): v for k, v in method.adapted_state_dict().items()}
        hp = standalone_classifier_hparams(self.source_hparams)
        return {"state_dict": sd, "hyper_parameters": hp, "pytorch-lightning_version": lightning.__version__,
                "tta": {"method": method.name, "updates": method.updates,
                        "source_checkpoint": self.hparams.source_checkpoint}}
