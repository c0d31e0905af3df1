"""TTA methods in plain torch: ``source``, ``norm``, ``tent``, ``tent_filter`` and ``cafa``.

Every method owns a private copy of the source model (the source is never modified) and is called
once per test batch: ``logits = method(images)``. For adapting methods that call runs one forward,
takes one optimizer step on the loss of that forward, and returns the logits *of that forward*
(predictions are scored before the update they cause, as in TENT). ``reset()`` restores the
source parameters and a fresh optimizer: the stream runner calls it per batch (episodic) or per
domain (reset-each-shift); continual adaptation never calls it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .losses import cafa_loss, crowd_filter_mask, filtered_entropy_loss, softmax_entropy
from .source import FeatureClassifier
from .norms import norm_affine_params, source_stats, use_batch_stats

METHODS = ("source", "norm", "tent", "tent_filter", "cafa")
SMALL_BATCH = ("error", "source_stats")


@dataclass
class TTAConfig:
    """Hyper-parameters shared by the methods (see ``TTAModel`` for their documentation)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    adapt_norms: str | list[str] = "all"
    filter_alpha: float = 0.5
    filter_diversity: str = "kept"
    cafa_denominator: str = "all"
    small_batch: str = "error"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if self.small_batch not in SMALL_BATCH:
            raise ValueError(f"small_batch={self.small_batch!r}; choose one of {list(SMALL_BATCH)}.")
        if self.filter_diversity not in ("kept", "batch"):
            raise ValueError(f"filter_diversity={self.filter_diversity!r}; choose 'kept' or 'batch'.")
        if self.cafa_denominator not in ("all", "others"):
            raise ValueError(f"cafa_denominator={self.cafa_denominator!r}; choose 'all' or 'others'.")


class TTAMethod:
    """Base: no adaptation. Subclasses set ``batch_stats``/``trains`` and override ``_step``."""

    name = "source"
    batch_stats = False  # BatchNorm normalises with the test batch
    trains = False  # norm affine parameters are updated

    def __init__(self, model: FeatureClassifier, cfg: TTAConfig | None = None) -> None:
        self.cfg = cfg or TTAConfig()
        self.model = copy.deepcopy(model).eval()  # eval for good: dropout stays off
        self.model.requires_grad_(False)
        self._source_bn = use_batch_stats(self.model) if self.batch_stats else {}
        self.params = norm_affine_params(self.model, self.cfg.adapt_norms) if self.trains else []
        for p in self.params:
            p.requires_grad_(True)
        self._initial = [p.detach().clone() for p in self.params]
        self.updates = 0  # optimizer steps taken
        self.skipped = 0  # batches without an update (empty filter selection, non-finite loss)
        self.last: dict[str, float] = {}
        self._new_optimizer()

    def _new_optimizer(self) -> None:
        self.optimizer = torch.optim.Adam(self.params, lr=self.cfg.lr, betas=self.cfg.betas) if self.params else None

    def reset(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.params, self._initial):
                p.copy_(p0)
        self._new_optimizer()

    def to(self, device) -> "TTAMethod":
        self.model.to(device)
        self._initial = [p.to(device) for p in self._initial]
        self._source_bn = {k: (m.to(device), v.to(device)) for k, (m, v) in self._source_bn.items()}
        self._new_optimizer()
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self._source_bn and images.shape[0] < 2:
            if self.cfg.small_batch == "error":
                raise ValueError(f"method {self.name!r}: a batch of {images.shape[0]} image(s) cannot give BatchNorm "
                                 "test-batch statistics. Use batch_size >= 2 (the protocol uses 200), or set "
                                 "small_batch: source_stats to predict such batches with the source statistics "
                                 "and no update.")
            with source_stats(self.model, self._source_bn), torch.no_grad():
                self.skipped += 1
                return self.model(images)
        # Lightning's evaluation loops run under inference_mode; adaptation needs autograd back.
        with torch.inference_mode(False), torch.enable_grad():
            return self._step(images.clone() if images.is_inference() else images)

    def _step(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(images)

    def _update(self, loss: torch.Tensor | None) -> None:
        if loss is None or not torch.isfinite(loss):
            self.skipped += 1  # nothing to learn from (empty selection) or a broken loss: keep weights
            self.last["loss"] = float("nan") if loss is None else float(loss)
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        self.last["loss"] = float(loss.detach())

    def adapted_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the wrapped network with the *source* BatchNorm statistics, so the result loads
        into the original architecture (its running stats are not adapted: batch-stat mode is a
        property of the method, not of the weights)."""
        with source_stats(self.model, self._source_bn):
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


class Norm(TTAMethod):
    """BatchNorm with test-batch statistics, no parameter update (BN-adapt)."""

    name, batch_stats = "norm", True


class Tent(TTAMethod):
    """TENT: one Adam step on the mean softmax entropy per batch, norm affine parameters only."""

    name, batch_stats, trains = "tent", True, True

    def _step(self, images):
        logits = self.model(images)
        self._update(softmax_entropy(logits).mean())
        return logits.detach()


class TentFilter(TTAMethod):
    """TENT on the samples kept by the wisdom-of-crowds filter, minus alpha x H(mean prediction).

    The frozen "original" is the source model with the same normalisation as the adapting one
    (BatchNorm on test-batch statistics), so the filter compares the effect of the learned affine
    parameters only, not the shift from source to batch statistics.
    """

    name, batch_stats, trains = "tent_filter", True, True

    def __init__(self, model, cfg=None):
        super().__init__(model, cfg)
        self.original = copy.deepcopy(self.model).requires_grad_(False)
        self.kept, self.seen = 0, 0  # samples the filter kept / saw, over the whole stream

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.seen if self.seen else float("nan")

    def to(self, device):
        self.original.to(device)
        return super().to(device)

    def _step(self, images):
        logits = self.model(images)
        with torch.no_grad():
            p_orig = self.original(images).softmax(-1)
        keep = crowd_filter_mask(logits.detach().softmax(-1), p_orig)
        self.last["kept"] = float(keep.float().mean())
        self.kept += int(keep.sum())
        self.seen += keep.numel()
        self._update(filtered_entropy_loss(logits, keep, self.cfg.filter_alpha, self.cfg.filter_diversity))
        return logits.detach()


class Cafa(TTAMethod):
    """CAFA: pull penultimate features towards the source Gaussian of their pseudo-label."""

    name, batch_stats, trains = "cafa", True, True

    def __init__(self, model, cfg=None, stats=None):
        if stats is None:
            raise ValueError("cafa needs source statistics: compute them with `mmalign tta stats` "
                             "or set cafa_source_shards so adapt computes them.")
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
        self._update(cafa_loss(feats, logits, self.stats.means, self.stats.precision, self.cfg.cafa_denominator))
        return logits.detach()


_CLASSES = {"source": TTAMethod, "norm": Norm, "tent": Tent, "tent_filter": TentFilter, "cafa": Cafa}


def build_method(name: str, model: FeatureClassifier, cfg: TTAConfig | None = None, stats=None) -> TTAMethod:
    if name not in _CLASSES:
        raise ValueError(f"unknown TTA method {name!r}; choose from {list(METHODS)}.")
    if name == "cafa":
        return Cafa(model, cfg, stats)
    return _CLASSES[name](model, cfg)
