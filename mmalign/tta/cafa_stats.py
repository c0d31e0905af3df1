"""Source class-conditional Gaussians of penultimate features, for CAFA.

Means ``mu_c`` (C, d) and a precision matrix: shared (tied) ``(d, d)`` — the pooled within-class
covariance — or class-wise ``(C, d, d)``. Both are shrunk towards a scaled identity,
``S <- (1 - lambda) S + lambda * tr(S)/d * I``, which keeps them invertible when a class has fewer
samples than feature dimensions, and inverted in float64 (Cholesky, with growing jitter if needed).
Accumulation is in float64 too: sums of outer products of 10^4 features lose digits in float32.

The statistics are stored next to the source checkpoint as ``<checkpoint stem>.cafa_stats.pt``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .source import FeatureClassifier

COVARIANCE = ("auto", "shared", "classwise")
# above this many float64 entries (C*d*d) "auto" picks the shared covariance (~400 MB)
AUTO_CLASSWISE_LIMIT = 50_000_000


@dataclass
class SourceStats:
    means: torch.Tensor  # (C, d)
    precision: torch.Tensor  # (d, d) shared or (C, d, d) class-wise, float32
    counts: torch.Tensor  # (C,) samples per class
    covariance: str
    shrinkage: float
    meta: dict[str, Any]
    source: dict[str, Any] | None = None  # {"path", "sha256"} of the source checkpoint they describe

    def to(self, device) -> "SourceStats":
        return SourceStats(self.means.to(device), self.precision.to(device), self.counts, self.covariance,
                           self.shrinkage, self.meta, self.source)

    def matches(self, sha256: str | None) -> bool:
        """Whether these statistics were computed from the checkpoint whose bytes hash to ``sha256``
        (None: a model without checkpoint, random weights)."""
        if sha256 is None or not self.source:
            return sha256 is None and not self.source
        return self.source.get("sha256") == sha256

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        torch.save(asdict(self), tmp)
        os.replace(tmp, path)  # atomic: a half-written file is never picked up

    @classmethod
    def load(cls, path: str) -> "SourceStats":
        from mmalign.models.weights import load_checkpoint_file

        raw = load_checkpoint_file(path)  # weights_only: a crafted statistics file cannot run code
        fields = {"means", "precision", "counts", "covariance", "shrinkage", "meta", "source"}
        if not isinstance(raw, dict) or not {"means", "precision", "counts"} <= set(raw):
            raise ValueError(f"'{path}' is not a CAFA statistics file (expected keys {sorted(fields)}). Delete it "
                             "to have adapt recompute the statistics.")
        return cls(**{k: v for k, v in raw.items() if k in fields})


def stats_path_for(checkpoint: str) -> str:
    """``runs/.../last.ckpt`` -> ``runs/.../last.cafa_stats.pt``."""
    stem, _ = os.path.splitext(checkpoint)
    return stem + ".cafa_stats.pt"


def _shrink_and_invert(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12) / d
    cov = (1 - shrinkage) * cov + shrinkage * scale[..., None, None] * eye
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    jitter = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(cov + jitter * scale[..., None, None] * eye)
        if not bool(info.any()):
            prec = torch.cholesky_inverse(chol)
            return 0.5 * (prec + prec.transpose(-1, -2))
        jitter = 1e-6 if jitter == 0 else jitter * 10
    raise FloatingPointError("source covariance is not positive definite even with jitter; raise shrinkage "
                             "(e.g. 0.3) or use more source samples.")


@torch.no_grad()
def compute_source_stats(model: FeatureClassifier, batches: Iterable[dict], num_classes: int,
                         covariance: str = "auto", shrinkage: float = 0.1, max_samples: int | None = None,
                         device: str | torch.device = "cpu") -> SourceStats:
    """Class means and shrunk, inverted covariance of ``model``'s penultimate features.

    ``batches`` yields dicts with ``image`` and ``label`` (an ``ImageLabelDataModule`` loader);
    the model runs in eval mode with its source BatchNorm statistics. ``max_samples`` caps the
    labelled source subset (the first samples of the stream).
    """
    if covariance not in COVARIANCE:
        raise ValueError(f"covariance={covariance!r}; choose one of {list(COVARIANCE)}.")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}.")
    model = model.eval().to(device)
    sums = sq = None
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    seen = 0
    for batch in batches:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        if max_samples is not None:
            images, labels = images[: max_samples - seen], labels[: max_samples - seen]
        _, feats = model.forward_with_features(images)
        f = feats.double()
        d = f.shape[1]
        if sums is None:
            if covariance == "auto":
                covariance = "classwise" if num_classes * d * d <= AUTO_CLASSWISE_LIMIT else "shared"
            sums = torch.zeros(num_classes, d, dtype=torch.float64, device=device)
            sq = torch.zeros((num_classes, d, d) if covariance == "classwise" else (d, d),
                             dtype=torch.float64, device=device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"label {int(labels.max())} outside [0, {num_classes}); check num_classes/label_key.")
        sums.index_add_(0, labels, f)
        counts += torch.bincount(labels, minlength=num_classes).double()
        if covariance == "classwise":
            sq.index_add_(0, labels, f[:, :, None] * f[:, None, :])
        else:
            sq += f.T @ f
        seen += len(labels)
        if max_samples is not None and seen >= max_samples:
            break
    if sums is None:
        raise ValueError("no source samples: check the source shards of the CAFA statistics.")
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"classes {missing[:10]} have no source sample; use more source data (max_samples) "
                         "or a source split that covers every class.")
    means = sums / counts[:, None]
    if covariance == "classwise":
        # unbiased per class; a class with one sample gets a zero scatter and relies on shrinkage
        cov = (sq - counts[:, None, None] * means[:, :, None] * means[:, None, :])
        cov = cov / (counts - 1).clamp_min(1)[:, None, None]
    else:
        between = (counts[:, None, None] * means[:, :, None] * means[:, None, :]).sum(0)
        cov = (sq - between) / max(1.0, float(counts.sum()) - num_classes)
    prec = _shrink_and_invert(cov, shrinkage)
    meta = {"num_samples": int(counts.sum()), "feature_dim": int(means.shape[1]), "num_classes": num_classes}
    return SourceStats(means.float().cpu(), prec.float().cpu(), counts.long().cpu(), covariance, float(shrinkage), meta)
