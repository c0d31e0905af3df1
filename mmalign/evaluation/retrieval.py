"""Image-text retrieval recall@k in both directions, with several captions per image.

Similarities are cosine (features are L2-normalised in ``update``). ``compute`` ranks the
gallery one query chunk at a time, so its working memory is ``chunk_size x gallery`` rather
than a dense ``queries x gallery`` matrix, which for 25k captions x 5k images would already be
half a gigabyte in float32 and grows quadratically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["RetrievalRecall"]


def _cat(state: list[Tensor] | Tensor) -> Tensor | None:
    """A cat-list state as one tensor: a list before sync, a tensor after; ``None`` if empty."""
    if isinstance(state, Tensor):
        return state if state.numel() > 0 else None
    if len(state) == 0:
        return None
    return dim_zero_cat(state)


class RetrievalRecall(Metric):
    """Recall@k for image->text and text->image retrieval.

    Args:
        top_k: the ``k`` values to report. For ``k`` at least the gallery size the whole gallery
            is "retrieved", so recall is 1.0 for every query that has a correct answer.
        chunk_size: queries ranked at once in ``compute``; peak extra memory is about
            ``chunk_size x gallery`` floats.
        allow_duplicate_image_ids: with ids, an image id seen more than once (a padded
            ``DistributedSampler`` repeats samples at the tail, possibly on another rank) is kept
            once, at its first occurrence. Set ``False`` to raise instead, if repeats mean a bug.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Two ways to call ``update`` (use one of them for the whole evaluation, on every rank):

    * ``update(image_features, text_features)``: one caption per image, row ``i`` of each is a
      pair. Pairs are matched by position after ranks are gathered (torchmetrics concatenates
      the states of all ranks in the same order for every state), so no ids are needed; padded
      duplicates cannot be detected in this mode.
    * ``update(image_features, text_features, text_image_ids, image_ids)``: ``image_ids``
      ``(B_img,)`` are globally unique integer ids of the images in this batch, and
      ``text_image_ids`` ``(B_txt,)`` give, for every caption, the id of its image. A caption and
      its image may arrive in different batches or on different ranks. Every caption must point
      to an image that is passed at some point. Images without captions stay in the text->image
      gallery as distractors but are not counted as image->text queries (they have no correct
      answer). Captions are all counted as queries: repeated captions are counted repeatedly.

    Image->text is a hit at ``k`` if ANY caption of the image is among the top ``k`` texts.
    ``compute()`` returns fractions in ``[0, 1]`` under the keys ``i2t_r{k}`` and ``t2i_r{k}``.
    Ties are broken by ``torch.topk`` (unspecified order).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        top_k: Sequence[int] = (1, 5, 10),
        chunk_size: int = 1024,
        allow_duplicate_image_ids: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        top_k = tuple(top_k)
        if not top_k or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in top_k):
            raise ValueError(f"top_k must be a non-empty sequence of positive ints, got {top_k!r}")
        if len(set(top_k)) != len(top_k):
            raise ValueError(f"top_k has duplicates: {top_k!r}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.top_k = top_k
        self.chunk_size = chunk_size
        self.allow_duplicate_image_ids = bool(allow_duplicate_image_ids)
        for name in ("image_features", "text_features", "image_ids", "text_image_ids"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_features: Tensor,
        text_features: Tensor,
        text_image_ids: Tensor | None = None,
        image_ids: Tensor | None = None,
    ) -> None:
        if image_features.ndim != 2 or text_features.ndim != 2:
            raise ValueError(f"features must be 2-D (N, D), got image {tuple(image_features.shape)} "
                             f"and text {tuple(text_features.shape)}")
        if image_features.shape[1] != text_features.shape[1]:
            raise ValueError(f"image and text features must share the embedding size, got "
                             f"{image_features.shape[1]} and {text_features.shape[1]}")
        if (text_image_ids is None) != (image_ids is None):
            raise ValueError("pass both text_image_ids and image_ids, or neither "
                             "(one caption per image, paired by row)")
        if text_image_ids is None:
            if image_features.shape[0] != text_features.shape[0]:
                raise ValueError(f"without ids, row i of image and text features is a pair, so their lengths must "
                                 f"match; got {image_features.shape[0]} images and {text_features.shape[0]} texts. "
                                 "Pass text_image_ids and image_ids for several captions per image")
        else:
            for name, ids, n in (("image_ids", image_ids, image_features.shape[0]),
                                 ("text_image_ids", text_image_ids, text_features.shape[0])):
                if ids.ndim != 1 or ids.shape[0] != n:
                    raise ValueError(f"{name} must have shape ({n},), got {tuple(ids.shape)}")
                if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                    raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
            self.image_ids.append(image_ids.detach().long())
            self.text_image_ids.append(text_image_ids.detach().long())
        # Normalised once here so compute only needs dot products.
        self.image_features.append(F.normalize(image_features.detach(), dim=-1))
        self.text_features.append(F.normalize(text_features.detach(), dim=-1))

    def _targets(self, images: Tensor, texts: Tensor) -> tuple[Tensor, Tensor]:
        """Deduplicated image gallery and, per caption, the row of its image in that gallery."""
        image_ids, text_ids = _cat(self.image_ids), _cat(self.text_image_ids)
        if image_ids is None and text_ids is None:
            if images.shape[0] != texts.shape[0]:
                raise RuntimeError(f"paired mode expects as many texts as images, got {texts.shape[0]} and "
                                   f"{images.shape[0]}; were ids passed on some ranks or batches only?")
            return images, torch.arange(images.shape[0], device=images.device)
        if image_ids is None or text_ids is None or image_ids.shape[0] != images.shape[0] \
                or text_ids.shape[0] != texts.shape[0]:
            raise RuntimeError("ids were passed in some updates (or on some ranks) but not in others; "
                               "use one calling convention for the whole evaluation")
        image_ids, text_ids = image_ids.long(), text_ids.long()
        unique, inverse = torch.unique(image_ids, return_inverse=True)
        if unique.shape[0] != image_ids.shape[0] and not self.allow_duplicate_image_ids:
            counts = torch.bincount(inverse)
            raise ValueError(f"image ids repeat, e.g. {unique[counts > 1][:5].tolist()}; each image must be "
                             "passed once (or set allow_duplicate_image_ids=True)")
        # Gallery row r holds the first occurrence of id unique[r]; without repeats this is just
        # the images sorted by id.
        positions = torch.arange(image_ids.shape[0], device=image_ids.device)
        first = torch.full_like(unique, image_ids.shape[0]).scatter_reduce(0, inverse, positions, "amin")
        images = images[first]
        rows = torch.searchsorted(unique, text_ids).clamp_max(unique.shape[0] - 1)
        missing = unique[rows] != text_ids
        if bool(missing.any()):
            raise ValueError(f"{int(missing.sum())} caption(s) point to image ids never passed as image_ids, "
                             f"e.g. {text_ids[missing][:5].tolist()}")
        return images, rows

    def _recall(self, queries: Tensor, gallery: Tensor, is_hit: Callable[[int, Tensor], Tensor]) -> Tensor:
        """Fraction of queries with a hit within each k; ``is_hit(start, topk_idx) -> (c, K) bool``."""
        k_max = min(max(self.top_k), gallery.shape[0])
        cols = torch.tensor([min(k, gallery.shape[0]) - 1 for k in self.top_k], device=queries.device)
        hits = torch.zeros(len(self.top_k), dtype=torch.long, device=queries.device)
        gallery_t = gallery.float().T
        for start in range(0, queries.shape[0], self.chunk_size):
            sims = queries[start:start + self.chunk_size].float() @ gallery_t  # (chunk, gallery)
            ranked = sims.topk(k_max, dim=1).indices
            # "hit within k" = any hit among the first k ranks, for every k at once.
            within = is_hit(start, ranked).cumsum(dim=1) > 0
            hits += within[:, cols].sum(dim=0)
        return hits.double() / max(queries.shape[0], 1)

    def compute(self) -> dict[str, Tensor]:
        images, texts = _cat(self.image_features), _cat(self.text_features)
        if images is None or texts is None:
            raise RuntimeError("RetrievalRecall.compute() called before any update with images and texts")
        gallery, text_rows = self._targets(images, texts)

        # Image -> text: only images with at least one caption are queries.
        has_caption = torch.zeros(gallery.shape[0], dtype=torch.bool, device=gallery.device)
        has_caption[text_rows] = True
        query_rows = has_caption.nonzero().squeeze(1)
        i2t = self._recall(
            gallery[query_rows], texts,
            lambda start, ranked: text_rows[ranked] == query_rows[start:start + ranked.shape[0], None],
        )
        t2i = self._recall(
            texts, gallery,
            lambda start, ranked: ranked == text_rows[start:start + ranked.shape[0], None],
        )
        out = {f"i2t_r{k}": i2t[i].float() for i, k in enumerate(self.top_k)}
        out.update({f"t2i_r{k}": t2i[i].float() for i, k in enumerate(self.top_k)})
        return out
