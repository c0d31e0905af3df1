"""TTA methods in plain torch: ``source``, ``norm``, ``tent``, ``tent_filter``, ``cafa`` (here) and the
peers ``eata`` (``mmalign.tta.eata``) and ``sar`` (``mmalign.tta.sar``).

Every method owns a private copy of the source model (the source is never modified) and is called
once per test batch: ``logits = method(images)``. For adapting methods that call runs the forward(s),
takes one optimizer step on the loss and returns the logits *of the first forward* (predictions are
scored before the update they cause, as in TENT). BatchNorm normalises with prior-mixed statistics
(``mmalign.tta.norms.PriorNorm``, ``norm.prior`` = 0 is TENT's pure batch statistics). ``reset()``
restores the source parameters, a fresh optimizer and the source statistics: the stream runner calls
it per batch (episodic), per domain (reset-each-shift) or when the guard sees a collapse.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch

from .losses import cafa_loss, crowd_filter_mask, filtered_entropy_loss, softmax_entropy
from .norms import PriorNorm, norm_affine_params
from .source import FeatureClassifier
from .specs import AdaptSpec, CafaSpec, EataSpec, FilterSpec, NormSpec, SarSpec

METHODS = ("source", "norm", "tent", "tent_filter", "cafa", "eata", "sar")


@dataclass(frozen=True)
class TTAConfig:
    """The specs every method reads (see ``mmalign.tta.specs`` for their options)."""

    adapt: AdaptSpec = field(default_factory=AdaptSpec)
    norm: NormSpec = field(default_factory=NormSpec)
    filter: FilterSpec = field(default_factory=FilterSpec)
    cafa: CafaSpec = field(default_factory=CafaSpec)
    eata: EataSpec = field(default_factory=EataSpec)
    sar: SarSpec = field(default_factory=SarSpec)


class TTAMethod:
    """Base: no adaptation. Subclasses set ``adapts_norm``/``trains`` and override ``_step``."""

    name = "source"
    adapts_norm = False  # BatchNorm on prior-mixed test-batch statistics
    trains = False  # norm affine parameters are updated

    def __init__(self, model: FeatureClassifier, cfg: TTAConfig | None = None) -> None:
        self.cfg = cfg or TTAConfig()
        self.model = copy.deepcopy(model).eval()  # eval for good: dropout stays off
        self.model.requires_grad_(False)
        self.norm = PriorNorm(self.model, self.cfg.norm.prior, self.cfg.norm.momentum) if self.adapts_norm else None
        named = norm_affine_params(self.model, self.cfg.adapt.norms) if self.trains else []
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        for p in self.params:
            p.requires_grad_(True)
        self._initial = [p.detach().clone() for p in self.params]
        self.updates = 0  # optimizer steps taken
        self.skipped = 0  # batches without an update (empty selection, non-finite loss)
        self.small_batches = 0  # batches below adapt.min_batch: predicted without an update
        self.fallbacks = 0  # batches predicted with the source statistics (the guard's fallback)
        self.last: dict[str, float] = {}
        self._new_optimizer()

    @property
    def adapts(self) -> bool:
        return self.adapts_norm or self.trains

    def _new_optimizer(self) -> None:
        a = self.cfg.adapt
        if not self.params:
            self.optimizer = None
        elif a.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=a.lr, momentum=a.momentum)
        else:
            self.optimizer = torch.optim.Adam(self.params, lr=a.lr, betas=tuple(a.betas))

    def reset(self) -> None:
        """Source parameters, a fresh optimizer and the source normalisation statistics."""
        with torch.no_grad():
            for p, p0 in zip(self.params, self._initial):
                p.copy_(p0)
        self._new_optimizer()
        if self.norm is not None:
            self.norm.reset()

    def to(self, device) -> "TTAMethod":
        self.model.to(device)
        self._initial = [p.to(device) for p in self._initial]
        if self.norm is not None:
            self.norm.to(device)
        self._new_optimizer()
        return self

    def __call__(self, images: torch.Tensor, source_stats: bool = False) -> torch.Tensor:
        """Predict ``images`` and learn from them; ``source_stats``: predict with the source (reference)
        statistics and learn nothing (the guard's fallback for batches whose statistics would mislead)."""
        self.last = {}
        if source_stats and self.norm is not None:
            self.fallbacks += 1
            with self.norm.source_stats(), torch.no_grad():
                return self.model(images)
        if self.adapts and images.shape[0] < self.cfg.adapt.min_batch:
            return self._small(images)
        # Lightning's evaluation loops run under inference_mode; adaptation needs autograd back.
        with torch.inference_mode(False), torch.enable_grad():
            logits = self._step(images.clone() if images.is_inference() else images)
        if self.norm is not None:
            self.norm.commit()
        return logits

    def _small(self, images: torch.Tensor) -> torch.Tensor:
        """A batch too small to learn from: predicted without an update (and without moving the
        running statistics), with the prior-mixed statistics, or the source's when the prior is 0."""
        if self.cfg.adapt.small_batch == "error":
            raise ValueError(f"method {self.name!r}: a batch of {images.shape[0]} image(s) is below adapt.min_batch="
                             f"{self.cfg.adapt.min_batch}. Use a larger batch_size, or set adapt.small_batch: merge "
                             "(join the short last batch of a domain to the one before) or predict (predict it "
                             "without an update).")
        self.small_batches += 1
        pure_batch = self.norm is not None and self.cfg.norm.prior == 0
        with (self.norm.source_stats() if pure_batch else contextlib.nullcontext()), torch.no_grad():
            logits = self.model(images)
        if self.norm is not None:
            self.norm.reset_seen()
        return logits

    def _step(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(images)

    def _update(self, loss: torch.Tensor | None) -> bool:
        if loss is None or not torch.isfinite(loss):
            self.skipped += 1  # nothing to learn from (empty selection) or a broken loss: keep weights
            self.last["loss"] = float("nan") if loss is None else float(loss)
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        self.last["loss"] = float(loss.detach())
        return True

    def adapted_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the wrapped network with the reference BatchNorm statistics (the source's, or the
        running ones with ``norm.momentum``), so the result loads into the original architecture."""
        with self.norm.exported() if self.norm is not None else contextlib.nullcontext():
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


class Norm(TTAMethod):
    """BatchNorm with prior-mixed test-batch statistics, no parameter update (BN-adapt at prior 0)."""

    name, adapts_norm = "norm", True


class Tent(TTAMethod):
    """TENT: one step on the mean softmax entropy per batch, norm affine parameters only."""

    name, adapts_norm, trains = "tent", True, True

    def _step(self, images):
        logits = self.model(images)
        self._update(softmax_entropy(logits).mean())
        return logits.detach()


class TentFilter(TTAMethod):
    """TENT on the samples kept by the wisdom-of-crowds filter, minus alpha x H(mean prediction).

    The frozen "original" is the source model with the same normalisation as the adapting one (the
    same prior, its own running statistics), so the filter compares the effect of the learned affine
    parameters only, not the shift from source to batch statistics.
    """

    name, adapts_norm, trains = "tent_filter", True, True

    def __init__(self, model, cfg=None):
        super().__init__(model, cfg)
        self.original = copy.deepcopy(model).eval().requires_grad_(False)
        self.original_norm = PriorNorm(self.original, self.cfg.norm.prior, self.cfg.norm.momentum)
        self.kept, self.seen = 0, 0  # samples the filter kept / saw, over the whole stream

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.seen if self.seen else float("nan")

    def to(self, device):
        self.original.to(device)
        self.original_norm.to(device)
        return super().to(device)

    def reset(self):
        super().reset()
        self.original_norm.reset()

    def _step(self, images):
        logits = self.model(images)
        with torch.no_grad():
            p_orig = self.original(images).softmax(-1)
        self.original_norm.commit()
        keep = crowd_filter_mask(logits.detach().softmax(-1), p_orig)
        self.last["kept"] = float(keep.float().mean())
        self.kept += int(keep.sum())
        self.seen += keep.numel()
        f = self.cfg.filter
        self._update(filtered_entropy_loss(logits, keep, f.alpha, f.diversity))
        return logits.detach()


class Cafa(TTAMethod):
    """CAFA: pull penultimate features towards the source Gaussian of their pseudo-label."""

    name, adapts_norm, trains = "cafa", True, True

    def __init__(self, model, cfg=None, stats=None):
        if stats is None:
            raise ValueError("cafa needs source statistics: compute them with `mmalign tta stats` "
                             "or set data.init_args.shards.train so adapt computes them.")
        super().__init__(model, cfg)
        self.stats = stats

    def to(self, device):
        self.stats = self.stats.to(device)
        return super().to(device)

    def _step(self, images):
        logits, feats = self.model.forward_with_features(images)
        if feats.shape[-1] != self.stats.means.shape[-1]:
            raise ValueError(f"feature dim {feats.shape[-1]} != source statistics dim {self.stats.means.shape[-1]}: "
                             "the statistics belong to another model; recompute them.")
        self._update(cafa_loss(feats, logits, self.stats.means, self.stats.precision, self.cfg.cafa.denominator))
        return logits.detach()


def build_method(name: str, model: FeatureClassifier, cfg: TTAConfig | None = None, stats=None,
                 fisher=None) -> TTAMethod:
    """One method by name; ``stats``: CAFA's source statistics, ``fisher``: EATA's (``eata.fisher_information``)."""
    from .eata import Eata
    from .sar import Sar

    classes = {"source": TTAMethod, "norm": Norm, "tent": Tent, "tent_filter": TentFilter, "sar": Sar}
    if name == "cafa":
        return Cafa(model, cfg, stats)
    if name == "eata":
        return Eata(model, cfg, fisher)
    if name not in classes:
        raise ValueError(f"unknown TTA method {name!r}; choose from {list(METHODS)}.")
    return classes[name](model, cfg)
