"""Geometry of a joint embedding: alignment, uniformity (Wang and Isola, 2020) and modality gap.

All three are measured on L2-normalised features:

* alignment ``E ||f(x) - f(y)||^2`` over positive (image, text) pairs; 0 is perfect, 4 is opposite;
* uniformity ``log E exp(-2 ||f(x) - f(x')||^2)`` over distinct pairs ``x != x'`` (by index)
  within one modality, reported for images and texts separately. It lies in ``[-8, 0]``: 0 when
  all features coincide (collapse), -4 when all pairs are orthogonal; lower is more uniform;
* modality gap ``||mean f(image) - mean f(text)||``, the distance between the two centroids.

Alignment and the centroids are exact running sums over every pair. Uniformity needs all pairs,
so the features are kept (optionally a reservoir sample of them) and reduced in row chunks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from mmalign.distributed import get_rank

__all__ = ["EmbeddingGeometry", "uniformity"]


def uniformity(features: Tensor, chunk_size: int = 1024) -> Tensor:
    """``log mean_{i != j} exp(-2 ||x_i - x_j||^2)`` of unit-norm ``(N, D)`` rows, ``chunk_size`` rows at a time.

    Memory is ``chunk_size x N`` instead of ``N x N``. The sum runs in float64: each term lies in
    ``[e^-8, 1]`` and ``N^2`` of them lose digits in float32 by ``N ~ 1e4``.
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 samples, got {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    x = features.float()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, n, chunk_size):
        block = x[start:start + chunk_size]
        # For unit vectors ||a - b||^2 = 2 - 2 a.b; clamp the rounding noise that goes below zero.
        sq_dist = (2.0 - 2.0 * block @ x.T).clamp_min(0.0)
        kernel = torch.exp(-2.0 * sq_dist)
        rows = torch.arange(block.shape[0], device=x.device)
        kernel[rows, start + rows] = 0.0  # drop i == j: those pairs would add a constant 1 each
        total += kernel.sum(dtype=torch.float64)
    return torch.log(total / (n * (n - 1))).float()


class EmbeddingGeometry(Metric):
    """Alignment, per-modality uniformity and modality gap of paired image/text embeddings.

    Args:
        chunk_size: rows per block when computing uniformity; memory ``chunk_size x N``.
        max_samples: if set, uniformity uses a uniform reservoir sample of at most this many
            pairs per rank (the same pairs for both modalities) instead of every feature, which
            bounds memory and the ``O(N^2)`` compute. After ranks sync up to
            ``world_size * max_samples`` samples are used; with equal-size shards each rank's
            reservoir is a uniform sample of its shard, so their union is as well. Alignment and
            the modality gap always use every pair.
        seed: seeds the reservoir draws. Each update's draws derive from ``(seed, rank, number of
            pairs seen so far)`` alone, so the same stream always keeps the same samples, ranks
            draw independently, and ``forward``/``reset`` do not disturb the sequence.
        kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(image_features, text_features)``: ``(B, D)`` each, row ``i`` a positive pair; both are
    normalised here. With several captions per image, pass one row per (image, caption) pair:
    alignment is then over all pairs, and image uniformity counts a repeated image's pairs too.

    ``compute()`` returns ``{"alignment", "uniformity_image", "uniformity_text", "modality_gap"}``.
    Every rank must have seen at least one batch before ``compute`` (torchmetrics cannot gather
    a feature list from a rank that has none).
    """

    is_differentiable = False
    higher_is_better = None  # lower alignment / uniformity is better, the gap has no "better"
    # The reservoir depends on the running count, which the fast forward path (reset, update on
    # the batch, merge) would break; the full path calls update on the accumulated state.
    full_state_update = True

    def __init__(self, chunk_size: int = 1024, max_samples: int | None = None, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 2):
            raise ValueError(f"max_samples must be None or an int >= 2 (uniformity needs pairs), got {max_samples!r}")
        self.chunk_size = chunk_size
        self.max_samples = max_samples
        self.seed = int(seed)

        self.add_state("align_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_pairs", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        # Scalar defaults that broadcast to (D,) on the first update, so D need not be configured.
        self.add_state("image_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("text_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("image_samples", default=[], dist_reduce_fx="cat")
        self.add_state("text_samples", default=[], dist_reduce_fx="cat")

    def _generator(self, seen: int) -> torch.Generator:
        # Large odd multipliers keep (seed, rank, seen) triples from colliding in practice.
        mixed = (self.seed * 1_000_003 + get_rank()) * 2_147_483_647 + seen
        return torch.Generator().manual_seed(mixed % 2**63)

    def _reservoir_add(self, images: Tensor, texts: Tensor, seen: int) -> None:
        """Algorithm R over pairs: item number ``t`` (0-based) replaces a random slot with prob ``M / (t + 1)``."""
        m = self.max_samples
        assert m is not None
        if not self.image_samples:
            self.image_samples.append(images[:0])
            self.text_samples.append(texts[:0])
        buf_i, buf_t = self.image_samples[0], self.text_samples[0]
        fill = max(0, min(m - seen, images.shape[0]))  # the first M items go straight in
        if fill:
            buf_i, buf_t = torch.cat([buf_i, images[:fill]]), torch.cat([buf_t, texts[:fill]])
        rest = images.shape[0] - fill
        if rest:
            t = torch.arange(seen + fill, seen + fill + rest, dtype=torch.float64)
            slots = (torch.rand(rest, generator=self._generator(seen), dtype=torch.float64) * (t + 1)).floor().long()
            accepted = (slots < m).nonzero().squeeze(1).tolist()
            # Sequential on purpose: two items may pick one slot and the later must win, which a
            # vectorised index_put does not guarantee. Only ~B*M/t items get here per batch.
            for i in accepted:
                buf_i[slots[i]] = images[fill + i]
                buf_t[slots[i]] = texts[fill + i]
        self.image_samples[0], self.text_samples[0] = buf_i, buf_t

    def update(self, image_features: Tensor, text_features: Tensor) -> None:
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(f"image and text features must both be (B, D) with row i a pair, got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        if image_features.shape[0] == 0:
            return
        img = F.normalize(image_features.detach().float(), dim=-1)
        txt = F.normalize(text_features.detach().float(), dim=-1)
        seen = int(self.num_pairs)  # local count: states are only synced inside compute
        self.align_sum += (img - txt).pow(2).sum(dim=1).sum(dtype=torch.float64)
        self.num_pairs += img.shape[0]
        self.image_sum = self.image_sum + img.sum(dim=0, dtype=torch.float64)
        self.text_sum = self.text_sum + txt.sum(dim=0, dtype=torch.float64)
        if self.max_samples is None:
            self.image_samples.append(img)
            self.text_samples.append(txt)
        else:
            self._reservoir_add(img, txt, seen)

    def compute(self) -> dict[str, Tensor]:
        n = int(self.num_pairs)
        if n == 0:
            raise RuntimeError("EmbeddingGeometry.compute() called before any non-empty update")
        images, texts = dim_zero_cat(self.image_samples), dim_zero_cat(self.text_samples)
        gap = (self.image_sum / n - self.text_sum / n).norm()
        return {
            "alignment": (self.align_sum / n).float(),
            "uniformity_image": uniformity(images, self.chunk_size),
            "uniformity_text": uniformity(texts, self.chunk_size),
            "modality_gap": gap.float(),
        }

