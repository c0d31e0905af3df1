"""Text-image alignment of generated images, scored by a judge's features: CLIP score and prompt accuracy.

A text-to-image model generates images for a fixed prompt set; a judge (any image-text embedding
model, e.g. a CLIP) embeds each image and its prompt. ``TextImageAlignment`` then reports

* ``clip_score``: ``100 * max(cos(image, prompt), 0)`` averaged over images (Hessel et al. 2021 with
  torchmetrics' scale of 100);
* ``acc``: the judge's zero-shot class of the image (nearest class embedding) equals the prompt's
  class; ``acc_<attribute>``: the predicted class agrees with the prompt's class on that attribute
  (e.g. colour, shape), given as a class -> attribute-value table;

each over all images and per group (``seen`` / ``heldout`` colour x shape combinations). It takes
features, not models, and keeps concatenation states, so torchmetrics gathers it across ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric


class TextImageAlignment(Metric):
    """CLIP score and prompt accuracy of generated images.

    Args:
        class_weights: ``(C, D)`` judge embeddings of the class prompts (``build_zeroshot_weights``).
        attributes: ``{name: [value of class 0, value of class 1, ...]}``, e.g. ``{"colour": [...]}``.
        groups: Names of the sample groups, indexed by the ``group`` argument of ``update``.
    """

    full_state_update = False

    def __init__(self, class_weights: Tensor, attributes: Mapping[str, Sequence] | None = None,
                 groups: Sequence[str] = ("seen", "heldout"), **kwargs) -> None:
        super().__init__(**kwargs)
        if class_weights.ndim != 2:
            raise ValueError(f"class_weights must be (C, D), got {tuple(class_weights.shape)}.")
        self.register_buffer("class_weights", F.normalize(class_weights.float(), dim=-1), persistent=False)
        self.attributes = {k: list(v) for k, v in (attributes or {}).items()}
        for name, values in self.attributes.items():
            if len(values) != class_weights.shape[0]:
                raise ValueError(f"attribute '{name}' lists {len(values)} values for {class_weights.shape[0]} classes.")
        self.groups = list(groups)
        for key in ("pred", "target", "group", "score"):
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(self, image_features: Tensor, prompt_features: Tensor, target: Tensor, group: Tensor) -> None:
        """``image_features`` and ``prompt_features`` (N, D): judge embeddings of each image and of the
        prompt it was generated for; ``target`` (N,) the prompt's class; ``group`` (N,) group index."""
        img = F.normalize(image_features.float(), dim=-1)
        txt = F.normalize(prompt_features.float(), dim=-1)
        self.pred.append((img @ self.class_weights.T).argmax(1))
        self.score.append(100.0 * (img * txt).sum(-1).clamp_min(0))
        self.target.append(target.long())
        self.group.append(group.long())

    def compute(self) -> dict[str, Tensor]:
        def cat(x):
            return torch.cat(x) if isinstance(x, list) else x

        pred, target, group, score = cat(self.pred), cat(self.target), cat(self.group), cat(self.score)
        out: dict[str, Tensor] = {}
        for gi, name in [(None, "all")] + list(enumerate(self.groups)):
            sel = torch.ones_like(target, dtype=torch.bool) if gi is None else group == gi
            if not sel.any():
                continue
            p, t = pred[sel], target[sel]
            out[f"{name}/clip_score"] = score[sel].mean()
            out[f"{name}/acc"] = (p == t).float().mean()
            for attr, values in self.attributes.items():
                table = {v: i for i, v in enumerate(dict.fromkeys(values))}
                ids = torch.tensor([table[v] for v in values], device=p.device)
                out[f"{name}/acc_{attr}"] = (ids[p] == ids[t]).float().mean()
        return out
