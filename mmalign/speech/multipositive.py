"""Contrastive loss with several positives per row (supervised-contrastive / CLAP-style).

When many clips in a batch share one transcript, plain InfoNCE treats every other clip of the same
transcript as a negative and pushes apart embeddings that should coincide. Here every column whose
*group id* (e.g. a transcript hash) equals the row's is a positive, and each row's loss is the
cross-entropy against the uniform distribution over its positives:

    l_i = -1/|P(i)| * sum_{p in P(i)} log softmax_j(t * a_i . b_j)[p]

(Khosla et al.'s "L_out" with cross-modal anchors, so the anchor itself is never among the
columns). With all ids distinct this is exactly CLIP's loss. The loss is symmetric: a -> b rows and
b -> a rows, averaged.

Multi-process: the same convention as :class:`mmalign.losses.contrastive.ClipLoss` (read its module
docstring): local rows x global columns, features gathered *with* gradients, so the mean over ranks
of the local losses is the global-batch loss and DDP averaging gives its exact gradient. Ids are
gathered without gradients (they are labels) to build the ``B x N`` positive mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.distributed import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size

from mmalign.losses.contrastive import as_scalar, check_features


def positive_mask(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool: True where the column shares the row's group id."""
    return row_ids[:, None] == col_ids[None, :]


def multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the cross-entropy against the uniform distribution over each row's positives."""
    counts = positives.sum(1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("a row has no positive column: every row's own pair must be among the columns "
                         "(are the ids of the rows and of the gathered columns from the same batch?)")
    target = positives.to(logits.dtype) / counts.to(logits.dtype)
    return F.cross_entropy(logits, target)


class MultiPositiveContrastiveLoss(nn.Module):
    """Symmetric InfoNCE where all pairs with the same group id are positives.

    Args:
        multi_positive: ``False`` ignores the ids and uses the diagonal only (plain CLIP), for
            ablations; ``True`` treats every column with the row's id as a positive.
        check_inputs: validate shapes/NaNs on every rank with one tiny all-gather per call.
    """

    def __init__(self, multi_positive: bool = True, check_inputs: bool = True) -> None:
        super().__init__()
        self.multi_positive = bool(multi_positive)
        self.check_inputs = bool(check_inputs)

    def forward(self, a_features: torch.Tensor, b_features: torch.Tensor, logit_scale: torch.Tensor | float,
                ids: torch.Tensor | None = None, local_only: bool = False,
                return_logits: bool = False):
        """``a_features``, ``b_features``: L2-normalised ``(B, D)``, row i of each a pair; ``ids (B,)``
        int64 group id of pair i (required when ``multi_positive``); ``logit_scale``: exponentiated.

        ``local_only`` skips every collective (evaluation with uneven per-rank batch counts)."""
        who = type(self).__name__
        logit_scale = as_scalar(logit_scale, "logit_scale", who)
        b = a_features.shape[0]
        if self.multi_positive:
            if ids is None:
                raise ValueError(f"{who}(multi_positive=True) needs ids: one int64 group id per pair "
                                 "(e.g. mmalign.speech.metrics.transcript_ids(texts))")
            if ids.shape != (b,) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"{who}: ids must be an integer tensor of shape ({b},), got {ids.dtype} "
                                 f"{tuple(ids.shape)}")
        rank, world = (0, 1) if local_only else (get_rank(), get_world_size())
        if self.check_inputs and not local_only:
            rank, world = check_features(
                a_features, b_features, who,
                no_negatives_why="with a single pair the softmax has one candidate, the loss is 0 and "
                "nothing is learned.")
        if world > 1:
            all_a = all_gather_with_grad(a_features, check_sizes=not self.check_inputs)
            all_b = all_gather_with_grad(b_features, check_sizes=not self.check_inputs)
        else:
            all_a, all_b = a_features, b_features
        logits_ab = logit_scale * a_features @ all_b.T  # (B, N): local rows x global columns
        logits_ba = logit_scale * b_features @ all_a.T
        if self.multi_positive:
            ids = ids.to(a_features.device).long()
            all_ids = all_gather_no_grad(ids, check_sizes=not self.check_inputs) if world > 1 else ids
            pos = positive_mask(ids, all_ids)
            loss = (multi_positive_ce(logits_ab, pos) + multi_positive_ce(logits_ba, pos)) / 2
        else:
            labels = torch.arange(rank * b, rank * b + b, device=a_features.device)
            loss = (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2
        return (loss, logits_ab, logits_ba) if return_logits else loss

    def extra_repr(self) -> str:
        return f"multi_positive={self.multi_positive}"
