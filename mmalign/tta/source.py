"""The model interface test-time adaptation needs, and loading of source classifiers.

A TTA model is anything that maps images to logits and can also return its penultimate features
(CAFA's Gaussians live in that space). ``FeatureClassifier`` is that interface; ``TimmClassifier``
adapts any timm model (ResNets, ViTs...) and ``SplitClassifier`` any ``backbone`` + ``head`` pair,
so an open_clip zero-shot classifier can later plug in with a linear head of class embeddings.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn


class FeatureClassifier(nn.Module):
    """``forward(x) -> logits``; ``forward_with_features(x) -> (logits, penultimate features)``."""

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


class TimmClassifier(FeatureClassifier):
    """A timm classifier: features = ``forward_head(forward_features(x), pre_logits=True)`` (after
    pooling and, for ViTs, ``fc_norm``); logits = the classifier applied to them, which equals
    ``net(x)`` in eval mode (head dropout is the only layer between them)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        for attr in ("forward_features", "forward_head", "get_classifier"):
            if not hasattr(net, attr):
                raise TypeError(f"{type(net).__name__} is not a timm classifier (no {attr}); wrap it in "
                                "SplitClassifier(backbone, head) instead.")
        self.net = net

    def forward_with_features(self, x):
        feats = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return self.net.get_classifier()(feats), feats


class SplitClassifier(FeatureClassifier):
    """Any ``backbone: images -> (B, d) features`` followed by ``head: (B, d) -> logits``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward_with_features(self, x):
        feats = self.backbone(x)
        return self.head(feats), feats


class ImageTower(nn.Module):
    """The image tower of an open_clip model, L2-normalised (keeps the whole CLIP model so the
    adapted weights save as a loadable CLIP checkpoint)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.clip.encode_image(x), dim=-1)


class ZeroShotHead(nn.Module):
    """Logits ``scale * f @ W.T`` from class embeddings ``W`` built from prompt templates."""

    def __init__(self, class_weights: torch.Tensor, scale: float = 100.0) -> None:
        super().__init__()
        self.register_buffer("weights", class_weights)
        self.scale = scale

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scale * feats @ self.weights.T


def load_open_clip_zeroshot(checkpoint: str, hp: dict[str, Any], classes: str | None) -> tuple[SplitClassifier, dict]:
    """A CLIP/SigLIP checkpoint of mmalign as a zero-shot classifier over ``classes`` (a class-spec
    file): image tower -> normalised features -> text-derived class weights."""
    if classes is None:
        raise ValueError("source_checkpoint is a CLIP/SigLIP checkpoint: set zeroshot_classes to a class-spec file "
                         "({'classnames': [...], 'templates': [...]}) whose class order matches the labels.")
    import open_clip

    from mmalign.models.open_clip_models import create_open_clip, open_clip_transforms
    from mmalign.evaluation import build_zeroshot_weights, load_class_spec
    from mmalign.models.weights import load_weights

    m = hp["model"]  # hp: mmalign.checkpoint_layout.clip_hparams
    clip = create_open_clip(m["name"], m.get("cfg"))
    load_weights(clip, checkpoint, prefix="model.")
    clip.eval()
    spec = load_class_spec(classes)
    weights = build_zeroshot_weights(clip.encode_text, open_clip.get_tokenizer(m["name"]), spec.classnames,
                                     spec.templates)
    _, eval_transform = open_clip_transforms(clip, m.get("image_size"))
    info = {"kind": "open_clip_zeroshot", "model_name": m["name"], "model_cfg": m.get("cfg"),
            "num_classes": spec.num_classes, "classes": classes, "eval_transform": eval_transform,
            "contrastive_hparams": {k: v for k, v in hp.items() if not k.startswith("_")}}
    return SplitClassifier(ImageTower(clip), ZeroShotHead(weights)), info


def load_source(checkpoint: str | None, model_name: str | None = None, num_classes: int | None = None,
                model_kwargs: dict[str, Any] | None = None,
                zeroshot_classes: str | None = None) -> tuple[FeatureClassifier, dict[str, Any]]:
    """Build the source classifier; returns ``(model, hparams)``.

    ``checkpoint`` may be an ``ImageClassifier`` Lightning checkpoint (its hyper-parameters rebuild
    the timm model; ``model_name`` etc. must then be unset or agree), an mmalign CLIP/SigLIP
    checkpoint (adapted as a zero-shot classifier over ``zeroshot_classes``), or plain weights for
    the timm model named by ``model_name``. ``checkpoint=None`` builds randomly initialised weights: only
    useful for smoke tests, and said so on stderr.
    """
    hparams: dict[str, Any] = {}
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"source_checkpoint {checkpoint!r} does not exist. Train one with "
                                    "`python -m mmalign fit -c configs/classify/digits.yaml` and point "
                                    "source_checkpoint at runs/mmalign/version_N/checkpoints/last.ckpt.")
        from mmalign.models.weights import load_checkpoint_file

        from mmalign.checkpoint_layout import classifier_hparams, clip_hparams

        raw = load_checkpoint_file(checkpoint, mmap=True)  # weights_only: a crafted file cannot run code
        saved = raw.get("hyper_parameters") if isinstance(raw, dict) else None
        if (hp := clip_hparams(saved)) is not None:
            return load_open_clip_zeroshot(checkpoint, hp, zeroshot_classes)
        if (hp := classifier_hparams(saved)) is not None:
            for key, given, have in (("model_name", model_name, hp["network"]["name"]),
                                     ("num_classes", num_classes, hp["num_classes"])):
                if given is not None and given != have:
                    raise ValueError(f"{key}={given!r} disagrees with the checkpoint's {have!r}; "
                                     f"leave {key} unset when source_checkpoint is an ImageClassifier checkpoint.")
            from mmalign.models.weights import load_weights
            from mmalign.models.timm_models import create_timm_model

            # rebuilt from the checkpoint's own hyper-parameters: the classifier's network is its
            # ``model`` attribute, so its weights are the state-dict keys under "model."
            net = create_timm_model(hp["network"]["name"], hp["num_classes"], False, None,
                                    **(hp["network"].get("kwargs") or {}))
            load_weights(net, checkpoint, prefix="model.")
            return TimmClassifier(net), dict(hp)
    if model_name is None or num_classes is None:
        raise ValueError("set model_name and num_classes: the source checkpoint is not an ImageClassifier "
                         "checkpoint (or none was given), so they cannot be read from it.")
    from mmalign.models.timm_models import create_timm_model

    if checkpoint is None:
        import sys

        print("[tta] source_checkpoint is null: using RANDOM weights (smoke test only).", file=sys.stderr)
    net = create_timm_model(model_name, num_classes, False, checkpoint, **(model_kwargs or {}))
    hparams.update(network={"name": model_name, "kwargs": model_kwargs or {}}, num_classes=num_classes)
    return TimmClassifier(net), hparams
