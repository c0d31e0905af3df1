"""TTA objectives as plain functions of logits and features (no model, no optimizer)."""

from __future__ import annotations

import math

import torch


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy (nats) of ``softmax(logits)``, shape (B,)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def reliable_entropy(logits: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-sample entropy, the reliable mask ``H < E0`` and ``E0 = margin * ln C`` (EATA's and SAR's
    entropy filter; both papers use margin 0.4)."""
    e0 = margin * math.log(logits.shape[-1])
    ent = softmax_entropy(logits)
    return ent, ent < e0, e0


def crowd_filter_mask(p_adapt: torch.Tensor, p_orig: torch.Tensor) -> torch.Tensor:
    """Wisdom-of-crowds filter: keep sample i iff ``p_adapt[i, c_o] >= p_orig[i, c_o]`` with
    ``c_o = argmax p_orig[i]`` (its confidence in the original prediction did not drop)."""
    c_o = p_orig.argmax(-1, keepdim=True)
    return p_adapt.gather(1, c_o).squeeze(1) >= p_orig.gather(1, c_o).squeeze(1)


def filtered_entropy_loss(logits: torch.Tensor, keep: torch.Tensor, alpha: float = 0.5,
                          diversity: str = "kept") -> torch.Tensor | None:
    """Mean entropy of the kept samples minus ``alpha`` x entropy of a mean prediction (the diversity
    term keeps predictions from collapsing onto one class).

    ``diversity="kept"`` averages the predictions of the kept samples; ``"batch"`` those of the whole
    batch, as the public reimplementation (UniEnt's ``ostta.py``) does: there the term also pulls on
    the samples the filter rejected. ``None`` when there is nothing to minimise (no sample kept and no
    whole-batch term): the caller skips the update, as a mean over zero samples is NaN.
    """
    if diversity not in ("kept", "batch"):
        raise ValueError(f"diversity={diversity!r}; choose 'kept' or 'batch'.")
    any_kept = bool(keep.any())
    if not any_kept and not (alpha and diversity == "batch"):
        return None
    loss = softmax_entropy(logits[keep]).mean() if any_kept else logits.new_zeros(())
    if alpha:
        mean_p = (logits[keep] if diversity == "kept" else logits).softmax(-1).mean(0)
        loss = loss + alpha * (mean_p * mean_p.clamp_min(1e-12).log()).sum()  # = -alpha * H(mean_p)
    return loss


def mahalanobis_sq(feats: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances ``D[b, c] = (f_b - mu_c)^T P_c (f_b - mu_c)``, shape (B, C).

    ``precision`` is (d, d) (shared covariance) or (C, d, d) (class-wise)."""
    diff = feats[:, None, :] - means[None].to(feats.dtype)  # (B, C, d)
    prec = precision.to(feats.dtype)
    if prec.dim() == 2:
        return torch.einsum("bcd,de,bce->bc", diff, prec, diff)
    return torch.einsum("bcd,cde,bce->bc", diff, prec, diff)


def cafa_loss(feats: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, precision: torch.Tensor,
              denominator: str = "all", eps: float = 1e-8) -> torch.Tensor:
    """CAFA: batch mean of ``log(D_y / sum_c D_c)`` with pseudo-label ``y = argmax logits``.

    ``denominator="all"`` sums over every class (the ratio lies in (0, 1]); ``"others"`` over
    c != y. The paper's exact denominator is unverified; "all" is the default because it is bounded
    and defined for two classes as well. Gradients flow through the features only: the
    pseudo-label is a discrete choice.
    """
    if denominator not in ("all", "others"):
        raise ValueError(f"cafa denominator={denominator!r}; choose 'all' or 'others'.")
    dist = mahalanobis_sq(feats, means, precision).clamp_min(eps)
    y = logits.argmax(-1, keepdim=True)
    d_y = dist.gather(1, y).squeeze(1)
    total = dist.sum(1) if denominator == "all" else dist.sum(1) - d_y
    return (d_y.log() - total.clamp_min(eps).log()).mean()
