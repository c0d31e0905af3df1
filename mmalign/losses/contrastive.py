"""Contrastive image-text losses: CLIP (softmax InfoNCE) and SigLIP (pairwise sigmoid).

Both take L2-normalised features of one local batch, ``image_features`` and ``text_features`` of
shape ``[B, D]`` where row i of each is the i-th matching pair, and the *already exponentiated*
logit scale ``t`` (as open_clip passes it).

Multi-process convention (shared with ``mmalign.distributed``): every rank computes a *local* loss
``L_r`` over its own B rows against all ``N = W * B`` columns of the global batch, so that

    global-batch loss  ==  mean over ranks of L_r,

and, because the gathers/exchanges send each feature's gradient back to the rank that owns it,
DDP's gradient averaging yields exactly the gradient of the global-batch loss. Consequently the
gradient that lands on a rank's *features* is ``W`` times the gradient of the global loss with respect
to them (DDP's ``1/W`` then cancels it). Memory is O(B x N) per rank instead of O(N^2).

The learnable parameters live in the model; :func:`init_logit_scale`, :func:`init_logit_bias` and
:func:`clamp_logit_scale_` create and constrain them with the papers' values.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.distributed import (
    all_gather_ints,
    all_gather_no_grad,
    all_gather_with_grad,
    get_rank,
    get_world_size,
    ring_exchange_bidir_with_grad,
    ring_shift_with_grad,
)
from mmalign.losses.tiled import check_tile_size, tiled_clip_loss, tiled_siglip_loss

LossKind = Literal["clip", "siglip"]

# CLIP: t = log(1/0.07), i.e. softmax temperature 0.07. SigLIP: t' = log 10 and b = -10, so the many
# negatives start with logits near -10 and the loss is not swamped by them at step 0.
_INIT_LOG_SCALE = {"clip": math.log(1 / 0.07), "siglip": math.log(10.0)}
_INIT_BIAS = {"siglip": -10.0}


def init_logit_scale(kind: LossKind = "clip", value: float | None = None) -> nn.Parameter:
    """Learnable *log* scale ``t`` (0-d); the losses take ``t.exp()``.

    ``kind`` picks the paper's initial value: ``"clip"`` -> log(1/0.07), ``"siglip"`` -> log(10).
    ``value`` (a log scale) overrides it.
    """
    if kind not in _INIT_LOG_SCALE:
        raise ValueError(f"kind must be one of {sorted(_INIT_LOG_SCALE)}, got {kind!r}")
    return nn.Parameter(torch.tensor(_INIT_LOG_SCALE[kind] if value is None else float(value)))


def init_logit_bias(kind: LossKind = "siglip", value: float | None = None) -> nn.Parameter:
    """Learnable logit bias ``b`` (0-d), initialised to -10 for SigLIP. CLIP has none."""
    if kind not in _INIT_BIAS:
        raise ValueError(
            f"only {sorted(_INIT_BIAS)} uses a logit bias, got kind={kind!r} "
            "(the CLIP softmax is invariant to a shared bias, so it has nothing to learn)"
        )
    return nn.Parameter(torch.tensor(_INIT_BIAS[kind] if value is None else float(value)))


def clamp_logit_scale_(
    log_scale: torch.Tensor, max_scale: float = 100.0, min_scale: float | None = None
) -> torch.Tensor:
    """In place, keep ``exp(log_scale) <= max_scale`` (and ``>= min_scale`` if given); returns it.

    Call after every optimizer step: CLIP clips the scale at 100 because a larger one makes the
    softmax nearly one-hot and training unstable.
    """
    if not max_scale > 0:
        raise ValueError(f"max_scale must be > 0, got {max_scale!r}")
    if min_scale is not None and not 0 < min_scale <= max_scale:
        raise ValueError(f"min_scale must be in (0, max_scale={max_scale}], got {min_scale!r}")
    with torch.no_grad():  # a parameter edit, not part of the graph
        log_scale.clamp_(min=None if min_scale is None else math.log(min_scale), max=math.log(max_scale))
    return log_scale


def _local_shape(x: torch.Tensor) -> list[int]:
    # [ndim, size0, size1] padded with zeros, so every rank contributes the same number of ints.
    return [x.dim(), *(list(x.shape[:2]) + [0, 0])[:2]]


def check_features(
    image_features: torch.Tensor, text_features: torch.Tensor, who: str, no_negatives_why: str
) -> tuple[int, int]:
    """Validate the pair on every rank; returns (rank, world_size).

    One tiny all-gather of shape/NaN facts means every rank raises the same error instead of one
    rank raising while the others hang in the next collective.
    """
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(x).__name__}")
    # A host sync, but a NaN caught here names its source; otherwise it surfaces later as a NaN loss.
    bad = [int(not torch.isfinite(image_features).all()), int(not torch.isfinite(text_features).all())]
    facts = all_gather_ints(_local_shape(image_features) + _local_shape(text_features) + bad,
                            device=image_features.device)
    rank, world = get_rank(), get_world_size()
    for r, f in enumerate(facts):
        where = f" on rank {r}" if world > 1 else ""
        img_dim, txt_dim, img_shape, txt_shape = f[0], f[3], tuple(f[1:3]), tuple(f[4:6])
        if img_dim != 2 or txt_dim != 2:
            raise ValueError(
                f"{who} expects features of shape [batch, dim]; got image_features with {img_dim} dims and "
                f"text_features with {txt_dim} dims{where}. Pool/flatten token outputs to one vector per sample."
            )
        if img_shape != txt_shape:
            raise ValueError(
                f"{who}: image_features {img_shape} and text_features {txt_shape} must have the same shape{where}: "
                "row i of each is the i-th matching pair, and both must live in one embedding space."
            )
        if f[6] or f[7]:
            which = " and ".join(n for n, b in (("image_features", f[6]), ("text_features", f[7])) if b)
            raise ValueError(
                f"{who}: {which} contain NaN or Inf{where}. Check the encoder output (fp16 overflow, a "
                "zero-norm vector before normalisation, a diverged step) before the loss."
            )
    shapes = [tuple(f[1:3]) for f in facts]
    if len(set(shapes)) > 1:
        raise ValueError(
            f"{who}: the per-rank batch sizes or feature dims differ ({dict(enumerate(shapes))}, rank: (batch, "
            "dim)). The local loss labels row i of rank r as global column r*B+i, so every rank needs the same B "
            "(use drop_last=True) and the same embedding dim."
        )
    sizes = [s[0] for s in shapes]
    if sum(sizes) < 2:
        raise ValueError(
            f"{who} needs at least 2 image-text pairs in the global batch, got {sum(sizes)}: {no_negatives_why} "
            "Raise the batch size."
        )
    return rank, world


def as_scalar(value: torch.Tensor | float, name: str, who: str) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{who}: {name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
    return value


def _ranks(check: bool, local_only: bool, image_features: torch.Tensor, text_features: torch.Tensor, who: str,
           no_negatives_why: str) -> tuple[int, int]:
    """(rank, world) a loss call computes over: (0, 1) for ``local_only`` (no collective), else the
    process group's, validated on every rank first when ``check`` is on."""
    if local_only:
        return 0, 1
    if check:
        return check_features(image_features, text_features, who, no_negatives_why=no_negatives_why)
    return get_rank(), get_world_size()


class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP: cross-entropy over ``t * img @ txt.T`` in both directions.

    ``loss = (CE(logits_per_image, labels) + CE(logits_per_text, labels)) / 2`` with labels on the
    (rank-offset) diagonal; each CE is a mean over the local rows.

    Args:
        label_smoothing: weight in [0, 1) spread uniformly over all N candidates of each row (the
            "improved CLIP recipe" uses 0.1).
        gather_with_grad: gather the other ranks' features with gradients (exact). ``False`` gathers
            them detached, so each feature only trains as a positive and as a negative of its own
            rank's rows: the known *silent* bug (the loss value is unchanged, the gradient is wrong).
            Kept only to demonstrate and compare; never use it for training.
        cache_labels: keep the label tensor per (device, B, rank offset) instead of rebuilding it.
        check_inputs: validate shapes/NaNs with one tiny all-gather and a host sync per call.
        tile_size: ``None`` builds the B x N logits (today's path). An int computes the same loss and
            gradients in tile_size x tile_size tiles recomputed in backward (``losses.tiled``), so
            memory kept for backward is O((B + N) x D) instead of O(B x N); ``return_logits`` is then
            unavailable.
    """

    def __init__(self, label_smoothing: float = 0.0, gather_with_grad: bool = True, cache_labels: bool = True,
                 check_inputs: bool = True, tile_size: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.tile_size = check_tile_size(tile_size, type(self).__name__)
        if self.tile_size is not None and not gather_with_grad:
            raise ValueError("ClipLoss: tile_size needs gather_with_grad=True; the detached gather is a known bug "
                             "kept only for comparison and has no tiled version.")
        self.label_smoothing = float(label_smoothing)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.check_inputs = bool(check_inputs)
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def labels(self, device: torch.device, batch: int, offset: int) -> torch.Tensor:
        """Target column of each local row: ``offset + i`` where ``offset = rank * B``."""
        key = (device, batch, offset)
        cached = self._labels.get(key)
        if cached is not None:
            return cached
        labels = torch.arange(offset, offset + batch, device=device, dtype=torch.long)
        if self.cache_labels:
            if len(self._labels) >= 8:  # odd batch sizes (eval, last batch) must not grow it forever
                self._labels.clear()
            self._labels[key] = labels
        return labels

    def _global(self, local: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        if world == 1:
            return local
        if self.gather_with_grad:
            return all_gather_with_grad(local, check_sizes=not self.check_inputs)
        # The buggy variant as open_clip's gather_with_grad=False builds it: the detached gather with
        # the local slice put back, so local features still get (only) the local gradient.
        gathered = all_gather_no_grad(local, check_sizes=not self.check_inputs)
        b = local.shape[0]
        return torch.cat([gathered[: rank * b], local, gathered[(rank + 1) * b :]])

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                return_logits: bool = False, local_only: bool = False):
        """Local-rows InfoNCE loss; with ``return_logits`` also ``(logits_per_image, logits_per_text)``, each B x N.

        ``local_only`` ignores other ranks (no collective): for evaluation, where ranks may hold
        different batch counts and a collective would wait forever."""
        who = type(self).__name__
        logit_scale = as_scalar(logit_scale, "logit_scale", who)
        rank, world = _ranks(
            self.check_inputs, local_only, image_features, text_features, who,
            "with a single pair there are no negatives, the softmax over one candidate is identically 1, so "
            "InfoNCE is 0 with zero gradient and nothing can be learned.",
        )
        b = image_features.shape[0]
        if self.tile_size is not None:
            if return_logits:
                raise ValueError(f"{who}: return_logits=True needs the B x N logits that tile_size={self.tile_size} "
                                 "exists to avoid; use a ClipLoss without tile_size to inspect logits.")
            return tiled_clip_loss(image_features, self._global(text_features, rank, world), logit_scale, rank,
                                   world, self.tile_size, self.label_smoothing)
        all_image = self._global(image_features, rank, world)
        all_text = self._global(text_features, rank, world)
        # Local rows x global columns: [B, D] @ [D, N] -> [B, N].
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        labels = self.labels(image_features.device, b, rank * b)
        loss = (
            F.cross_entropy(logits_per_image, labels, label_smoothing=self.label_smoothing)
            + F.cross_entropy(logits_per_text, labels, label_smoothing=self.label_smoothing)
        ) / 2
        return (loss, logits_per_image, logits_per_text) if return_logits else loss


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP over the global batch, computed in per-rank blocks.

    ``loss = -1/B * sum_ij log sigmoid(z_ij * (t * x_i . y_j + b))`` over the B local images i and
    all N texts j, with ``z_ij = +1`` for the matching pair and -1 otherwise. Normalised by the local
    batch size B (not B*N), as in the paper.

    Args:
        exchange: how the other ranks' text features reach this rank. ``"ring"`` passes text blocks
            between neighbours in ceil((W-1)/2) bidirectional steps (plus one one-way step when W-1
            is odd), peak memory B x B per block; ``"gather"`` all-gathers them (B x N, simpler).
            Both give exactly the global-batch loss and gradients.
        check_inputs: validate shapes/NaNs with one tiny all-gather and a host sync per call.
        tile_size: ``None`` builds each B x B (ring) or B x N (gather) block of logits. An int computes
            the same loss and gradients in tile_size x tile_size tiles recomputed in backward
            (``losses.tiled``); the ring then runs inside one autograd Function whose backward re-runs
            it, so memory kept for backward is O(B x D) (ring) or O(N x D) (gather).
    """

    def __init__(self, exchange: Literal["ring", "gather"] = "ring", check_inputs: bool = True,
                 tile_size: int | None = None) -> None:
        super().__init__()
        if exchange not in ("ring", "gather"):
            raise ValueError(f"exchange must be 'ring' or 'gather', got {exchange!r}")
        self.tile_size = check_tile_size(tile_size, type(self).__name__)
        self.exchange = exchange
        self.check_inputs = bool(check_inputs)
        self._signs: dict[tuple, torch.Tensor] = {}

    def signs(self, batch: int, columns: int, offset: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``z``: B x columns of -1 with +1 at (i, offset + i); offset < 0 means an all-negative block."""
        key = (batch, columns, offset, device, dtype)
        if key not in self._signs:
            z = -torch.ones(batch, columns, device=device, dtype=dtype)
            if offset >= 0:
                z[torch.arange(batch), torch.arange(offset, offset + batch)] = 1.0
            if len(self._signs) >= 8:
                self._signs.clear()
            self._signs[key] = z
        return self._signs[key]

    def _block(self, image_features, text_features, logit_scale, logit_bias, positive_offset: int) -> torch.Tensor:
        logits = logit_scale * image_features @ text_features.T + logit_bias
        z = self.signs(image_features.shape[0], text_features.shape[0], positive_offset,
                       logits.device, logits.dtype)
        return -F.logsigmoid(z * logits).sum() / image_features.shape[0]

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float, local_only: bool = False) -> torch.Tensor:
        """``local_only``: this rank's block only, no collective (evaluation with uneven batch counts)."""
        who = type(self).__name__
        logit_scale = as_scalar(logit_scale, "logit_scale", who)
        logit_bias = as_scalar(logit_bias, "logit_bias", who)
        rank, world = _ranks(
            self.check_inputs, local_only, image_features, text_features, who,
            "with a single pair there are no negatives, so the sigmoid loss only pushes that one similarity "
            "and the bias up and learns to call every pair a match.",
        )
        b = image_features.shape[0]
        if self.tile_size is not None:
            return tiled_siglip_loss(image_features, text_features, logit_scale, logit_bias, rank, world,
                                     self.tile_size, self.exchange)
        if world == 1 or self.exchange == "gather":
            all_text = text_features if world == 1 else all_gather_with_grad(text_features,
                                                                             check_sizes=not self.check_inputs)
            return self._block(image_features, all_text, logit_scale, logit_bias, positive_offset=rank * b)

        # Ring: own block first (the only one with positives), then W-1 all-negative blocks.
        loss = self._block(image_features, text_features, logit_scale, logit_bias, positive_offset=0)
        to_left = to_right = text_features
        num_bidir, one_way = divmod(world - 1, 2)
        for _ in range(num_bidir):
            # After step k this rank has seen blocks r +- 1..k; forwarding what arrived keeps it moving.
            from_right, from_left = ring_exchange_bidir_with_grad(to_left, to_right)
            loss = loss + self._block(image_features, from_right, logit_scale, logit_bias, positive_offset=-1)
            loss = loss + self._block(image_features, from_left, logit_scale, logit_bias, positive_offset=-1)
            to_left, to_right = from_right, from_left
        if one_way:
            # W even: the block opposite on the ring (r + W/2) is still missing; one rightward shift of
            # what came from the left (block r - num_bidir, or our own when W = 2) delivers it.
            from_left = ring_shift_with_grad(to_right, direction=1)
            loss = loss + self._block(image_features, from_left, logit_scale, logit_bias, positive_offset=-1)
        return loss
