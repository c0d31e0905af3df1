"""The options of ``TTAModel``, grouped by concern into small frozen dataclasses.

Each spec checks its own values in ``__post_init__`` (the error names the field, the bad value and
what is allowed). In a YAML config every spec is a nested mapping under ``model.init_args``, e.g.
``--model.init_args.norm.prior=16``. ``TTA_MOVED`` maps every flat option of the older ``TTAModel``
to its new place: an old config fails naming it, and ``migrate_flat`` reads old hyper-parameters.

Plain stdlib: importable without torch or Lightning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mmalign.specs import need, one_of, positive, unit_interval

SOURCE_KINDS = ("classifier", "open_clip", "timm")


def _null_path(spec, *names: str) -> None:
    """``--model.init_args.source.checkpoint=null`` reaches a nested spec as the string 'None' (jsonargparse
    in omegaconf mode); a path option takes it as null, as it does at the top level."""
    for name in names:
        if getattr(spec, name) in ("None", "null"):
            object.__setattr__(spec, name, None)
OPTIMIZERS = ("adam", "sgd")
NORM_SETS = ("all", "batchnorm", "layernorm", "groupnorm")
SMALL_BATCH = ("merge", "predict", "error")


@dataclass(frozen=True)
class SourceSpec:
    """The source model adapted at test time (never written to).

    Args:
        checkpoint: ``classifier``: an ``ImageClassifier`` checkpoint; ``open_clip``: an mmalign
            CLIP/SigLIP checkpoint (adapted as a zero-shot classifier over ``classes``); ``timm``:
            weights for the timm model ``name``. ``null``: random weights (smoke tests only).
        kind: ``classifier``, ``open_clip`` or ``timm``; null = detected from the checkpoint's
            hyper-parameters once, with a printed notice.
        name: timm model name (``timm`` only; for ``classifier`` it must match the checkpoint).
        num_classes: Class count (``timm`` only; idem).
        kwargs: Extra timm constructor arguments (``timm`` only).
        image_size: Eval-transform side (default: the checkpoint's, else 32).
        mean: Normalisation mean (default: the checkpoint's, else timm's ImageNet mean).
        std: Normalisation std (default: the checkpoint's, else timm's ImageNet std).
        classes: ``open_clip``: the class-spec file whose prompts build the zero-shot head (class
            order = label order). Adapt its LayerNorms with ``adapt.norms: layernorm``.
    """

    checkpoint: str | None = None
    kind: str | None = None
    name: str | None = None
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    classes: str | None = None

    def __post_init__(self) -> None:
        _null_path(self, "checkpoint", "kind", "name", "classes")
        if self.kind is not None:
            one_of("source.kind", self.kind, SOURCE_KINDS)
        positive("source.num_classes", self.num_classes, allow_none=True)
        need(self.num_classes is None or self.num_classes >= 2,
             f"source.num_classes must be >= 2, got {self.num_classes}.")
        positive("source.image_size", self.image_size, allow_none=True)
        for key in ("mean", "std"):
            v = getattr(self, key)
            need(v is None or len(tuple(v)) == 3, f"source.{key} must be three numbers (R, G, B), got {v}.")
        if self.std is not None:
            need(all(s > 0 for s in self.std), f"source.std must be > 0 per channel, got {self.std}.")


@dataclass(frozen=True)
class AdaptSpec:
    """How every adapting method updates: optimiser, which norm layers, small batches.

    Args:
        lr: Learning rate of the adapting methods (TENT: Adam 1e-3 at batch 200).
        optimizer: ``adam`` (TENT's CIFAR setting) or ``sgd`` (momentum ``momentum``; the official
            EATA/SAR code: SGD, momentum 0.9, lr 0.00025 per 64 images on ImageNet).
        momentum: SGD momentum.
        betas: Adam betas.
        norms: Norm layers whose affine parameters adapt: ``all``, ``batchnorm``, ``layernorm``,
            ``groupnorm`` or a list of module-name regexes.
        small_batch: A batch with fewer than ``min_batch`` samples: ``merge`` (the short last batch
            of a domain joins the batch before it; a domain that is one short batch is predicted
            without an update), ``predict`` (predicted without an update, BatchNorm with the
            prior-mixed statistics, or the source statistics when ``norm.prior`` is 0) or ``error``.
            Every such batch is counted in ``results.json``.
        min_batch: Smallest batch an adapting method learns from (>= 2: BatchNorm needs two samples
            for a variance).
    """

    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    norms: str | list[str] = "all"
    small_batch: str = "merge"
    min_batch: int = 2

    def __post_init__(self) -> None:
        positive("adapt.lr", self.lr)
        one_of("adapt.optimizer", self.optimizer, OPTIMIZERS)
        unit_interval("adapt.momentum", self.momentum)
        need(len(tuple(self.betas)) == 2, f"adapt.betas must be two numbers, got {self.betas}.")
        for i, b in enumerate(self.betas):
            unit_interval(f"adapt.betas[{i}]", b)
        if isinstance(self.norms, str):
            need(self.norms in NORM_SETS, f"adapt.norms must be one of {list(NORM_SETS)} or a list of module-name "
                                          f"regular expressions, got {self.norms!r}.")
        else:
            need(len(self.norms) > 0, "adapt.norms: give at least one module-name regular expression.")
        one_of("adapt.small_batch", self.small_batch, SMALL_BATCH)
        need(self.min_batch >= 2, f"adapt.min_batch must be >= 2 (a BatchNorm variance needs two samples), "
                                  f"got {self.min_batch}.")


#: the prior strength N chosen on the validation streams (scripts/bench_tta.py tune, TUNING_SEEDS): the smallest N
#: of the grid {0, 64, 256, 1024, 2048, inf} at which, with the guard's source fallback, no mild validation shift
#: is worse than the source (-0.03 points at worst) while the strong ones keep 70% of BN-adapt's gain
DEFAULT_PRIOR = 1024.0


@dataclass(frozen=True)
class NormSpec:
    """The statistics BatchNorm normalises with in every adapting method (and ``norm``).

    ``mu = N/(N+n) * mu_ref + n/(N+n) * mu_batch`` (the same for the variance), n = the test batch's
    size, N = ``prior`` (Schneider et al. 2020). ``mu_ref`` is the source statistic, or with
    ``momentum`` > 0 a running statistic that starts at the source and moves towards each batch's:
    ``ref <- (1 - momentum) * ref + momentum * batch`` after every batch (reset with the parameters).

    Args:
        prior: Prior strength N in samples; 0 = pure test-batch statistics (TENT, BN-adapt);
            ``.inf`` = the source statistics.
        momentum: Move the reference statistics towards the test batches; 0 = keep the source's.
    """

    prior: float = DEFAULT_PRIOR
    momentum: float = 0.0

    def __post_init__(self) -> None:
        positive("norm.prior", self.prior, zero=True)
        unit_interval("norm.momentum", self.momentum)

    def weight(self, n: int) -> float:
        """The reference statistics' share ``N / (N + n)`` for a batch of ``n``."""
        if math.isinf(self.prior):
            return 1.0
        return self.prior / (self.prior + n)


@dataclass(frozen=True)
class FilterSpec:
    """``tent_filter``: TENT on the samples the wisdom-of-crowds filter keeps.

    Args:
        alpha: Weight of the mean-prediction entropy (diversity) term.
        diversity: Whose mean prediction that term uses: ``kept`` (the filtered samples) or
            ``batch`` (the whole batch, as the public reimplementation does).
    """

    alpha: float = 0.5
    diversity: str = "kept"

    def __post_init__(self) -> None:
        positive("filter.alpha", self.alpha, zero=True)
        one_of("filter.diversity", self.diversity, ("kept", "batch"))


@dataclass(frozen=True)
class CafaSpec:
    """``cafa``: source class-conditional Gaussians of the penultimate features.

    Args:
        stats: Statistics file; default ``<checkpoint stem>.cafa_stats.pt`` next to the checkpoint,
            computed from ``data.init_args.shards.train`` when missing.
        covariance: ``auto`` (class-wise unless C*d*d > 5e7), ``shared`` or ``classwise``.
        shrinkage: Shrinkage towards a scaled identity, in [0, 1].
        denominator: ``all`` (sum over every class) or ``others`` (c != y); unverified in the paper.
    """

    stats: str | None = None
    covariance: str = "auto"
    shrinkage: float = 0.1
    denominator: str = "all"

    def __post_init__(self) -> None:
        _null_path(self, "stats")
        one_of("cafa.covariance", self.covariance, ("auto", "shared", "classwise"))
        unit_interval("cafa.shrinkage", self.shrinkage, closed_top=True)
        one_of("cafa.denominator", self.denominator, ("all", "others"))


@dataclass(frozen=True)
class EataSpec:
    """``eata`` (Niu et al. 2022; the official ``mr-eggplant/EATA`` code's settings).

    Args:
        margin: Reliable samples have entropy ``H < margin * ln C`` (E0; official 0.4).
        redundancy: A reliable sample is redundant when the cosine similarity of its softmax to the
            moving average of recent kept outputs is >= this (epsilon). Null = the official 0.05 at 1000
            classes scaled like the cosine of a one-hot to the uniform vector, ``0.05 * sqrt(1000 / C)``
            (0.5 at 10 classes): at 0.05 with 10 classes almost every sample counts as redundant.
        average: Decay of that moving average (official 0.9).
        fisher_beta: Weight of ``sum F (theta - theta_source)^2`` (official 2000); 0 = no regulariser (ETA).
        fisher_samples: Source samples (``shards.train``; pseudo-labelled, labels unused) the diagonal
            Fisher is estimated from (official 2000 clean images).
        fisher_batch: Batch size of that estimate (official 64: the squared gradient of each batch's
            mean cross-entropy, averaged over the batches).
    """

    margin: float = 0.4
    redundancy: float | None = None
    average: float = 0.9
    fisher_beta: float = 2000.0
    fisher_samples: int = 2000
    fisher_batch: int = 64

    def __post_init__(self) -> None:
        positive("eata.margin", self.margin)
        positive("eata.redundancy", self.redundancy, allow_none=True)
        unit_interval("eata.average", self.average)
        positive("eata.fisher_beta", self.fisher_beta, zero=True)
        positive("eata.fisher_samples", self.fisher_samples)
        positive("eata.fisher_batch", self.fisher_batch)


@dataclass(frozen=True)
class SarSpec:
    """``sar`` (Niu et al. 2023; the official ``mr-eggplant/SAR`` code's settings).

    Args:
        margin: Reliable samples have entropy ``H < margin * ln C`` (official 0.4), filtered before
            and again after the sharpness-aware perturbation.
        rho: SAM neighbourhood radius (official 0.05).
        average: Decay of the moving average of the filtered entropy (official 0.9).
        reset_below: Model recovery: reset when that average falls below this many nats; null = the
            official 0.2 nats at 1000 classes scaled like the margin, ``0.2 * ln C / ln 1000``.
        skip_top: Leave the top layers out of adaptation as the official code does (module names
            holding ``layer4``, ``blocks.9``-``blocks.11``, or the final ``norm``).
    """

    margin: float = 0.4
    rho: float = 0.05
    average: float = 0.9
    reset_below: float | None = None
    skip_top: bool = True

    def __post_init__(self) -> None:
        positive("sar.margin", self.margin)
        positive("sar.rho", self.rho)
        unit_interval("sar.average", self.average)
        positive("sar.reset_below", self.reset_below, allow_none=True, zero=True)


@dataclass(frozen=True)
class GuardSpec:
    """The no-harm guard: label-free signals per domain, a fallback to the source statistics, and a reset
    when a method collapses.

    ``source_fallback``: before the methods see a batch, the un-adapted model under the methods'
    normalisation (the ``norm`` method) and the source model predict it; when the former is less certain
    (higher mean entropy) than the source, the test-batch statistics are judged misleading (a mild shift,
    or a class-sorted batch whose statistics carry its labels): every adapting method predicts that
    batch with the source statistics and learns nothing from it. The same happens when the source
    model's predictions on the batch spread over the classes less than a class-balanced batch of that
    size would (``class_spread`` below ``min_class_spread``: a class-sorted or label-shifted batch, whose
    statistics carry its labels). Counted per domain.

    Every batch the adapted model is compared with the frozen source model; moving averages (decay
    ``average``) of three signals trip a reset of the parameters, optimiser and norm statistics:
    agreement with the source below ``min_agreement``; the adapted predictions' most frequent class
    taking ``max_class_gain`` more of the batch than the source's most frequent class does; the mean
    entropy below ``min_entropy_ratio`` times the source's. Only after ``warmup`` batches since the
    last reset.

    Args:
        source_fallback: Fall back to the source statistics on batches where the test-batch statistics
            leave the un-adapted model less certain than the source model.
        min_class_spread: With ``source_fallback``, also fall back on batches whose source predictions
            have a class-histogram entropy below this fraction of a class-balanced batch's (0: never).
        reset: Reset on collapse (false: only report the signals).
        min_agreement: Floor of the agreement with the source (fraction of samples).
        max_class_gain: Ceiling of the adapted top-class share minus the source's (fraction).
        min_entropy_ratio: Floor of the adapted / source mean-entropy ratio.
        average: Decay of the moving averages (per batch).
        warmup: Batches after a (re)start before the guard may act.
    """

    source_fallback: bool = True
    min_class_spread: float = 0.0
    reset: bool = True
    min_agreement: float = 0.5
    max_class_gain: float = 0.3
    min_entropy_ratio: float = 0.05
    average: float = 0.8
    warmup: int = 3

    def __post_init__(self) -> None:
        unit_interval("guard.min_class_spread", self.min_class_spread, closed_top=True)
        unit_interval("guard.min_agreement", self.min_agreement, closed_top=True)
        unit_interval("guard.max_class_gain", self.max_class_gain, closed_top=True)
        positive("guard.min_entropy_ratio", self.min_entropy_ratio, zero=True)
        unit_interval("guard.average", self.average)
        positive("guard.warmup", self.warmup, zero=True)


#: every flat option of the older TTAModel and where it lives now
TTA_MOVED = {
    "source_checkpoint": "source.checkpoint", "model_name": "source.name", "num_classes": "source.num_classes",
    "model_kwargs": "source.kwargs", "image_size": "source.image_size", "mean": "source.mean", "std": "source.std",
    "zeroshot_classes": "source.classes", "lr": "adapt.lr", "adapt_norms": "adapt.norms",
    "small_batch": "adapt.small_batch", "filter_alpha": "filter.alpha", "filter_diversity": "filter.diversity",
    "cafa_stats": "cafa.stats", "cafa_covariance": "cafa.covariance", "cafa_shrinkage": "cafa.shrinkage",
    "cafa_denominator": "cafa.denominator",
}
#: values of moved options whose spelling changed too
OLD_VALUES = {("adapt", "small_batch"): {"source_stats": "predict"}}
