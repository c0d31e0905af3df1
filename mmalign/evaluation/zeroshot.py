"""Zero-shot classification: prompt-ensemble class weights and a syncing top-k accuracy metric.

The classifier follows CLIP: for each class encode every prompt template, L2-normalise each
prompt embedding, average them, and re-normalise the mean. Logits are
``logit_scale * normalize(image_features) @ weights.T``; accuracy is micro-averaged (every
image counts once, whatever its class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mmalign.evaluation.prompts import ClassSpec, format_prompts, load_class_spec

__all__ = ["build_zeroshot_weights", "ZeroShotAccuracy"]


def _move(tokens: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return tokens
    if isinstance(tokens, Tensor):
        return tokens.to(device)
    if isinstance(tokens, dict):  # e.g. a Hugging Face BatchEncoding-like mapping of tensors
        return {k: _move(v, device) for k, v in tokens.items()}
    return tokens


@torch.no_grad()
def build_zeroshot_weights(
    encode_text: Callable[[Any], Tensor],
    tokenize: Callable[[list[str]], Any],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """Build the ``(C, D)`` float32 zero-shot classifier from class names and prompt templates.

    Args:
        encode_text: maps what ``tokenize`` returns to ``(N, D)`` text embeddings. Put the encoder
            in eval mode before calling; this function does not touch module state.
        tokenize: maps a list of ``N`` prompt strings to the encoder's input.
        classnames: ``C`` class names; row ``i`` of the result is class ``i``.
        templates: ``T`` templates with a ``{}`` or ``{c}`` placeholder.
        batch_size: prompts per ``encode_text`` call. Prompts are batched across classes, so the
            cost is ``ceil(C * T / batch_size)`` calls whatever ``T`` is.
        device: if given, tensor tokens (or dicts of tensors) are moved there before encoding.

    Returns:
        Unit-norm class embeddings, shape ``(C, D)``, dtype float32.
    """
    if isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError("classnames must be a non-empty sequence of strings")
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError("templates must be a non-empty sequence of strings")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    num_classes, num_templates = len(classnames), len(templates)
    # Class-major order: prompt j of class c sits at c * T + j, so a reshape recovers (C, T, D).
    prompts = [p for name in classnames for p in format_prompts(templates, name)]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        emb = encode_text(_move(tokenize(batch), device))
        if not isinstance(emb, Tensor) or emb.ndim != 2 or emb.shape[0] != len(batch):
            shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise ValueError(f"encode_text must return a ({len(batch)}, D) tensor for {len(batch)} prompts, "
                             f"got {shape}")
        # Normalise per prompt before averaging so no template dominates by its norm.
        chunks.append(F.normalize(emb.float(), dim=-1))
    per_prompt = torch.cat(chunks).reshape(num_classes, num_templates, -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


class ZeroShotAccuracy(Metric):
    """Top-k zero-shot accuracy against fixed class weights; states are sums, so ranks sync exactly.

    Args:
        class_weights: ``(C, D)`` classifier, e.g. from :func:`build_zeroshot_weights`. It is kept
            as a non-persistent buffer: ``.to(device)`` moves it, checkpoints do not store it.
        top_k: the ``k`` values to report as ``"top{k}"``. A ``k`` larger than ``C`` is clipped to
            ``C`` for the ranking (so ``top5`` with 3 classes is 1.0) but keeps its key, so logs
            have the same keys for every data set.
        logit_scale: multiplies the cosine similarities in :meth:`logits`. It does not change
            any top-k ranking; it is there so the logits match the model's training-time scale.
        per_class: also report ``"per_class_top1"`` (``(C,)``, NaN for classes never seen) and
            ``"mean_per_class_top1"`` (macro average over the classes seen).
        kwargs: passed to :class:`torchmetrics.Metric` (``process_group``, ``compute_on_cpu``, ...).

    ``update(image_features, labels)``: features ``(B, D)`` (normalised here), labels ``(B,)``
    integer class indices in ``[0, C)``. ``compute()`` returns fractions in ``[0, 1]``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    class_weights: Tensor
    correct: Tensor
    total: Tensor

    def __init__(
        self,
        class_weights: Tensor,
        top_k: Sequence[int] = (1, 5),
        logit_scale: float = 100.0,
        per_class: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(class_weights, Tensor) or class_weights.ndim != 2 or class_weights.shape[0] < 1:
            shape = tuple(class_weights.shape) if isinstance(class_weights, Tensor) else type(class_weights).__name__
            raise ValueError(f"class_weights must be a (num_classes, dim) tensor with num_classes >= 1, got {shape}")
        top_k = tuple(top_k)
        if not top_k or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in top_k):
            raise ValueError(f"top_k must be a non-empty sequence of positive ints, got {top_k!r}")
        if len(set(top_k)) != len(top_k):
            raise ValueError(f"top_k has duplicates: {top_k!r}")
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale!r}")
        self.top_k = top_k
        self.logit_scale = float(logit_scale)
        self.per_class = bool(per_class)
        self.num_classes = int(class_weights.shape[0])
        self.register_buffer("class_weights", F.normalize(class_weights.detach().float(), dim=-1), persistent=False)

        self.add_state("correct", torch.zeros(len(top_k), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        if self.per_class:
            self.add_state("class_correct", torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("class_total", torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")

    @classmethod
    def from_class_spec(
        cls,
        spec: ClassSpec | str | Path,
        encode_text: Callable[[Any], Tensor],
        tokenize: Callable[[list[str]], Any],
        batch_size: int = 256,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> ZeroShotAccuracy:
        """Build the classifier from a class-spec file (or :class:`ClassSpec`) and a text encoder."""
        if not isinstance(spec, ClassSpec):
            spec = load_class_spec(spec)
        weights = build_zeroshot_weights(encode_text, tokenize, spec.classnames, spec.templates, batch_size, device)
        return cls(weights, **kwargs)

    def logits(self, image_features: Tensor) -> Tensor:
        """``(B, C)`` zero-shot logits for raw image features."""
        feats = F.normalize(image_features.detach().float(), dim=-1)
        return self.logit_scale * feats @ self.class_weights.float().T

    def update(self, image_features: Tensor, labels: Tensor) -> None:
        if image_features.ndim != 2 or image_features.shape[1] != self.class_weights.shape[1]:
            raise ValueError(f"image_features must be (B, {self.class_weights.shape[1]}), "
                             f"got {tuple(image_features.shape)}")
        if labels.ndim != 1 or labels.shape[0] != image_features.shape[0]:
            raise ValueError(f"labels must be ({image_features.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel() == 0:
            return
        labels = labels.to(self.class_weights.device).long()
        # Out-of-range labels would otherwise count as silent misses (or crash per_class scatter).
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        logits = self.logits(image_features.to(self.class_weights.device))
        k_max = min(max(self.top_k), self.num_classes)
        ranked = logits.topk(k_max, dim=1).indices  # (B, k_max), best first
        match = ranked == labels[:, None]
        # match has at most one True per row, so a cumulative sum turns it into "hit within k".
        hit_within = match.cumsum(dim=1).bool()
        ks = torch.tensor([min(k, self.num_classes) - 1 for k in self.top_k], device=labels.device)
        self.correct += hit_within[:, ks].sum(dim=0)
        self.total += labels.numel()
        if self.per_class:
            self.class_correct += torch.bincount(labels[match[:, 0]], minlength=self.num_classes)
            self.class_total += torch.bincount(labels, minlength=self.num_classes)

    def compute(self) -> dict[str, Tensor]:
        total = self.total.clamp_min(1).double()  # an empty epoch reports 0, not NaN
        out = {f"top{k}": (self.correct[i].double() / total).float() for i, k in enumerate(self.top_k)}
        if self.per_class:
            seen = self.class_total > 0
            per_class = torch.full((self.num_classes,), float("nan"), device=self.class_total.device)
            per_class[seen] = (self.class_correct[seen].double() / self.class_total[seen].double()).float()
            out["per_class_top1"] = per_class
            out["mean_per_class_top1"] = per_class[seen].mean() if bool(seen.any()) else per_class.new_tensor(0.0)
        return out
