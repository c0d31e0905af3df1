"""The no-harm guard: what an unlabelled stream tells about an adapting method, and the reset on collapse.

An unlabelled stream has no error to watch, but it has the source model. Two references are kept:
the frozen source model itself (the agreement with it is *reported* per domain) and the un-adapted
model under the same normalisation (source weights, prior-mixed statistics: the ``norm`` method),
which the *guard* compares each adapted model with. The guard does not use the agreement with the
source itself: on a strong shift the source is wrong on half the samples and a healthy adapted model
disagrees with it that often, while the un-adapted model under the same statistics isolates what the
learned parameters changed. Three label-free signals, each a moving average over batches
(``GuardSpec.average``), describe a collapse:

- **agreement** with the un-adapted model (fraction of samples with the same argmax) falls below
  ``min_agreement``: the learned parameters overturned most predictions;
- **class gain**: the share of the batch in the adapted model's most frequent class, minus the share
  in the un-adapted model's most frequent class, exceeds ``max_class_gain``: predictions pile onto
  one class (a class-sorted stream makes the reference's share high too, so this is relative to it);
- **entropy ratio**: the adapted mean entropy over the un-adapted one falls below
  ``min_entropy_ratio``: entropy minimisation ran to its degenerate end (confident about everything).

When one trips (after ``warmup`` batches since the last start) the method is reset: its parameters,
optimizer and normalisation statistics return to the source's (SAR's model recovery, applied to every
method). Plain torch.
"""

from __future__ import annotations

import torch

from .specs import GuardSpec


_UNIFORM_ENTROPY: dict[tuple[int, int], float] = {}


def uniform_histogram_entropy(n: int, c: int, draws: int = 2000) -> float:
    """Expected entropy of the class histogram of ``n`` labels drawn uniformly from ``c`` classes (Monte
    Carlo with a fixed generator, cached): what a class-balanced batch of that size shows, below ``ln c``
    when ``n`` is small."""
    key = (n, c)
    if key not in _UNIFORM_ENTROPY:
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, c, (draws, n), generator=g)
        counts = torch.zeros(draws, c).scatter_add_(1, labels, torch.ones(draws, n))
        q = counts / n
        _UNIFORM_ENTROPY[key] = float(-(q * q.clamp_min(1e-12).log()).sum(-1).mean())
    return _UNIFORM_ENTROPY[key]


def class_spread(pred: torch.Tensor, num_classes: int) -> float:
    """Entropy of the batch's predicted-class histogram over what a class-balanced batch of the same size
    would show: about 1 for a shuffled stream of balanced classes, lower when the batch holds a few
    classes (a class-sorted folder, a label-shifted stream), whose normalisation statistics then carry
    its labels rather than its domain."""
    n = len(pred)
    if n < 2 or num_classes < 2:
        return 1.0
    q = torch.bincount(pred, minlength=num_classes).float() / n
    h = float(-(q * q.clamp_min(1e-12).log()).sum())
    return h / max(uniform_histogram_entropy(n, num_classes), 1e-12)


def batch_signals(p_adapt: torch.Tensor, p_source: torch.Tensor) -> dict[str, float]:
    """The three per-batch signals from the adapted and the reference softmax outputs, shape (B, C)."""
    a, s = p_adapt.argmax(-1), p_source.argmax(-1)
    n, c = len(a), p_adapt.shape[-1]
    share_a = float(torch.bincount(a, minlength=c).max()) / n
    share_s = float(torch.bincount(s, minlength=c).max()) / n
    h_a = float(-(p_adapt * p_adapt.clamp_min(1e-12).log()).sum(-1).mean())
    h_s = float(-(p_source * p_source.clamp_min(1e-12).log()).sum(-1).mean())
    return {"agreement": float((a == s).float().mean()), "class_gain": share_a - share_s,
            "entropy_ratio": h_a / max(h_s, 1e-12)}


class Guard:
    """Moving averages of ``batch_signals`` for one method, and the decision to reset it."""

    def __init__(self, spec: GuardSpec) -> None:
        self.spec = spec
        self.restart()

    def restart(self) -> None:
        self.avg: dict[str, float] = {}
        self.batches = 0

    #: the most extreme averages seen after warm-up over the whole run (kept across restarts): how close
    #: a healthy run comes to each threshold, which is what the thresholds are chosen from
    extremes: dict[str, float] | None = None

    def update(self, p_adapt: torch.Tensor, p_source: torch.Tensor) -> str | None:
        """Feed one batch; returns why the method should be reset now, or None."""
        sig = batch_signals(p_adapt, p_source)
        d = self.spec.average
        self.avg = sig if not self.avg else {k: d * self.avg[k] + (1 - d) * v for k, v in sig.items()}
        self.batches += 1
        if self.batches <= self.spec.warmup:
            return None
        a = self.avg
        e = self.extremes or {"agreement": 1.0, "class_gain": -1.0, "entropy_ratio": float("inf")}
        self.extremes = {"agreement": min(e["agreement"], a["agreement"]), "class_gain": max(e["class_gain"], a["class_gain"]),
                         "entropy_ratio": min(e["entropy_ratio"], a["entropy_ratio"])}
        if not self.spec.reset:
            return None
        if a["agreement"] < self.spec.min_agreement:
            return f"agreement with the un-adapted model {a['agreement']:.2f} < {self.spec.min_agreement}"
        if a["class_gain"] > self.spec.max_class_gain:
            return f"one class takes {a['class_gain']:+.2f} more of the batch than the un-adapted model's top class"
        if a["entropy_ratio"] < self.spec.min_entropy_ratio:
            return f"entropy {a['entropy_ratio']:.3f}x the un-adapted model's < {self.spec.min_entropy_ratio}"
        return None
