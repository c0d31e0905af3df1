"""``TTAModel``: the ``model`` of an ``adapt`` config — the source classifier plus the settings of
the adaptation methods, as grouped specs (``mmalign.tta.specs``). The adaptation itself runs in
``mmalign.tta.adapt_command``."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch

from datamodules.base import Preprocess
from datamodules.transforms import default_image_transform
from mmalign.specs import coerce, store_specs

from .methods import METHODS, TTAConfig, build_method
from .specs import (OLD_VALUES, TTA_MOVED, AdaptSpec, CafaSpec, EataSpec, FilterSpec, GuardSpec, NormSpec, SarSpec,
                    SourceSpec)
from .stream import check_methods

SPECS = {"source": SourceSpec, "adapt": AdaptSpec, "norm": NormSpec, "filter": FilterSpec, "cafa": CafaSpec,
         "eata": EataSpec, "sar": SarSpec, "guard": GuardSpec}


def _spec(value: Any, key: str):
    """A spec from a spec or mapping; values an older config spelled differently are translated."""
    if isinstance(value, dict):
        value = {k: OLD_VALUES.get((key, k), {}).get(v, v) if isinstance(v, str) else v for k, v in value.items()}
    return coerce(value, SPECS[key], key)


class TTAModel(pl.LightningModule):
    """A source classifier to adapt at test time.

    Args:
        source: The model adapted (``SourceSpec``): checkpoint, kind (detected when null), timm name
            and class count for plain weights, transform overrides, zero-shot classes for CLIP/SigLIP.
        methods: Methods compared on the same batches, from ``source``, ``norm``, ``tent``,
            ``tent_filter``, ``cafa``, ``eata``, ``sar``.
        adapt: Optimiser, adapted norm layers, small batches (``AdaptSpec``), shared by every method.
        norm: BatchNorm statistics: prior strength N mixing source and test-batch statistics, running
            reference (``NormSpec``).
        filter: ``tent_filter``'s diversity term (``FilterSpec``).
        cafa: CAFA's statistics file, covariance, shrinkage, denominator (``CafaSpec``).
        eata: EATA's entropy margin, redundancy filter, Fisher regulariser (``EataSpec``).
        sar: SAR's entropy margin, SAM radius, model recovery (``SarSpec``).
        guard: The no-harm guard's collapse thresholds and reset (``GuardSpec``).
    """

    moved_options = TTA_MOVED

    def __init__(
        self,
        source: SourceSpec = SourceSpec(),
        methods: list[str] = list(METHODS),  # noqa: B006, B008 (jsonargparse reads the default)
        adapt: AdaptSpec = AdaptSpec(),
        norm: NormSpec = NormSpec(),
        filter: FilterSpec = FilterSpec(),  # noqa: A002 (the option's name)
        cafa: CafaSpec = CafaSpec(),
        eata: EataSpec = EataSpec(),
        sar: SarSpec = SarSpec(),
        guard: GuardSpec = GuardSpec(),
    ) -> None:
        super().__init__()
        check_methods(methods)
        specs = {k: _spec(v, k) for k, v in (("source", source), ("adapt", adapt), ("norm", norm), ("filter", filter),
                                               ("cafa", cafa), ("eata", eata), ("sar", sar), ("guard", guard))}
        self.save_hyperparameters()
        store_specs(self, specs)
        self.source_spec, self.guard_spec = specs["source"], specs["guard"]
        self.cfg = TTAConfig(specs["adapt"], specs["norm"], specs["filter"], specs["cafa"], specs["eata"], specs["sar"])
        from .source import load_source

        self.source, self.source_hparams, self.source_file = load_source(self.source_spec)
        self.source.eval()
        self.num_classes = int(self.source_hparams["num_classes"])
        hp, s = self.source_hparams, self.source_spec
        self._transform = (s.image_size or hp.get("image_size") or 32,
                           tuple(s.mean or hp.get("mean") or (0.485, 0.456, 0.406)),
                           tuple(s.std or hp.get("std") or (0.229, 0.224, 0.225)))

    @property
    def source_checkpoint(self) -> str | None:
        return self.source_spec.checkpoint

    @property
    def source_digest(self) -> str | None:
        """sha256 of the source checkpoint's bytes, computed once when it was read."""
        return self.source_file.sha256 if self.source_file is not None else None

    @property
    def preprocess(self) -> Preprocess:
        if "eval_transform" in self.source_hparams:  # open_clip: the model's own preprocessing
            t = self.source_hparams["eval_transform"]
            return Preprocess(train_transform=t, eval_transform=t)
        size, mean, std = self._transform
        t = default_image_transform(size, False, mean, std)
        return Preprocess(train_transform=t, eval_transform=t)  # source data for CAFA/EATA: no augmentation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.source(images)

    def stats_path(self, out_dir: str) -> str:
        from .cafa_stats import stats_path_for

        if self.cfg.cafa.stats:
            return self.cfg.cafa.stats
        if self.source_checkpoint:
            return stats_path_for(self.source_checkpoint)
        return os.path.join(out_dir, "cafa_stats.pt")

    def build_methods(self, stats=None, fisher=None) -> dict:
        return {name: build_method(name, self.source, self.cfg, stats, fisher) for name in self.hparams.methods}

    def adapted_checkpoint(self, method) -> dict:
        """A checkpoint of a method's adapted weights in the source's own format (loadable by the module
        that trained it), written by that method family's export function."""
        extra = {"tta": {"method": method.name, "updates": method.updates, "source_checkpoint": self.source_checkpoint,
                         "norm_prior": self.cfg.norm.prior}}
        from .source import checkpoint_format

        sd = method.adapted_state_dict()
        kind = self.source_hparams["kind"]
        if kind == "open_clip":
            clip = {k.removeprefix("backbone.clip."): v for k, v in sd.items() if k.startswith("backbone.clip.")}
            return checkpoint_format("open_clip").adapted_checkpoint(self.source_hparams["contrastive_hparams"], clip,
                                                                     extra)
        adapted_checkpoint = checkpoint_format("classifier").adapted_checkpoint
        net = {k.removeprefix("net."): v for k, v in sd.items()}
        if kind == "classifier":
            return adapted_checkpoint(self.source_hparams["classifier_hparams"], net, extra)
        hp = self.source_hparams  # plain timm weights: written as the ImageClassifier they amount to
        return adapted_checkpoint({"network": {"name": hp["model_name"], "kwargs": hp["model_kwargs"]},
                                   "num_classes": hp["num_classes"],
                                   "transform": {"image_size": self._transform[0], "mean": list(self._transform[1]),
                                                 "std": list(self._transform[2])}}, net, extra)
