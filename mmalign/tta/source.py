"""The model interface test-time adaptation needs, and loading of source classifiers.

A TTA model is anything that maps images to logits and can also return its penultimate features
(CAFA's Gaussians live in that space). ``FeatureClassifier`` is that interface; ``TimmClassifier``
adapts any timm model (ResNets, ViTs...) and ``SplitClassifier`` any ``backbone`` + ``head`` pair,
so an open_clip zero-shot classifier can later plug in with a linear head of class embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass
class SourceFile:
    """A source checkpoint read once: its loaded contents and the sha256 of its bytes (what CAFA's
    statistics are tied to)."""

    path: str
    raw: Any
    sha256: str


def read_source_file(path: str) -> SourceFile:
    """Read the file's bytes once, hash them, and load them with ``weights_only=True`` (a crafted file
    cannot run code); empty, damaged and unsafe files get the shared loader's one-line refusals."""
    import hashlib
    import io
    import pickle

    from mmalign.models.weights import UnreadableCheckpointError, UnsafeCheckpointError, _refusal

    if not os.path.isfile(path):
        raise FileNotFoundError(f"source.checkpoint {path!r} does not exist. Train one with "
                                "`python -m mmalign fit -c configs/classify/digits.yaml` and point "
                                "source.checkpoint at runs/mmalign/version_N/checkpoints/last.ckpt.")
    with open(path, "rb") as fh:
        data = fh.read()
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        raise UnreadableCheckpointError(f"source.checkpoint {path!r} is empty (0 bytes): it was never completely "
                                        "written or copied. Use another checkpoint or copy it again.")
    if len(data) > 8 and data[8:9] == b"{" and not data.startswith(b"PK"):  # safetensors: 8-byte length + JSON
        from safetensors.torch import load as load_safetensors

        return SourceFile(path, load_safetensors(data), digest)
    try:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        if isinstance(exc, UnsafeCheckpointError):
            raise
        raise _refusal(path, exc) from None
    return SourceFile(path, raw, digest)


#: the module that owns each checkpoint format (reads it, writes adapted weights back in it). Looked up by
#: name when a checkpoint of that kind is used, as the CLI finds its subcommands: a method package never
#: imports another one, and deleting one leaves the others working (only its kind becomes unavailable).
FORMATS = {"open_clip": "mmalign.contrastive.export", "classifier": "mmalign.classify.export"}


def checkpoint_format(kind: str):
    """The export module of ``kind`` (``hparams_of``, the reader, ``adapted_checkpoint``)."""
    import importlib

    try:
        return importlib.import_module(FORMATS[kind])
    except ModuleNotFoundError as exc:
        raise ValueError(f"source.kind {kind!r} needs {FORMATS[kind]}, which is not installed ({exc}).") from None


def detect_kind(file: SourceFile | None) -> str:
    """``open_clip`` / ``classifier`` when that format recognises the checkpoint's hyper-parameters, else ``timm``."""
    if file is None:
        return "timm"
    for kind in FORMATS:
        try:
            if checkpoint_format(kind).hparams_of(file.raw) is not None:
                return kind
        except ValueError:
            continue  # that method package is not installed: not its checkpoint
    return "timm"


def load_open_clip_zeroshot(file: SourceFile, classes: str | None) -> tuple[SplitClassifier, dict]:
    """A CLIP/SigLIP checkpoint of mmalign as a zero-shot classifier over ``classes`` (a class-spec
    file): image tower -> normalised features -> text-derived class weights."""
    if classes is None:
        raise ValueError("source.kind is open_clip (a CLIP/SigLIP checkpoint): set source.classes to a class-spec file "
                         "({'classnames': [...], 'templates': [...]}) whose class order matches the labels.")
    import open_clip

    from mmalign.evaluation import build_zeroshot_weights, load_class_spec
    from mmalign.models.open_clip_models import open_clip_transforms

    clip, info = checkpoint_format("open_clip").model_from_checkpoint(file.raw, f"source.checkpoint {file.path!r}")
    spec = load_class_spec(classes)
    weights = build_zeroshot_weights(clip.encode_text, open_clip.get_tokenizer(info["model_name"]), spec.classnames,
                                     spec.templates)
    _, eval_transform = open_clip_transforms(clip, info["image_size"])
    hp = {"kind": "open_clip", "num_classes": spec.num_classes, "classes": classes, "eval_transform": eval_transform,
          "contrastive_hparams": info["hparams"]}
    return SplitClassifier(ImageTower(clip), ZeroShotHead(weights)), hp


def load_source(spec, log=print) -> tuple[FeatureClassifier, dict[str, Any], SourceFile | None]:
    """Build the source classifier of a ``SourceSpec``; returns ``(model, hparams, file)``.

    The checkpoint is read once (``read_source_file``). ``kind`` null: detected from the file, with a
    notice; ``classifier`` rebuilds the timm network from the checkpoint's own hyper-parameters
    (``name``/``num_classes`` must then be unset or agree); ``open_clip`` adapts a CLIP/SigLIP
    checkpoint as a zero-shot classifier over ``classes``; ``timm`` loads plain weights into the timm
    model ``name``. No checkpoint: random weights, only useful for smoke tests, and said so on stderr.
    """
    file = read_source_file(spec.checkpoint) if spec.checkpoint is not None else None
    kind = spec.kind
    if kind is None:
        kind = detect_kind(file)
        if file is not None:
            log(f"[adapt] source.kind not set: {file.path} is read as '{kind}' (set source.kind: {kind} to say so)")
    where = f"source.checkpoint {spec.checkpoint!r}"
    if kind == "open_clip":
        if file is None:
            raise ValueError("source.kind open_clip needs source.checkpoint (an mmalign CLIP/SigLIP checkpoint).")
        model, hp = load_open_clip_zeroshot(file, spec.classes)
        return model, hp, file
    if kind == "classifier":
        if file is None:
            raise ValueError("source.kind classifier needs source.checkpoint (an ImageClassifier checkpoint).")
        net, info = checkpoint_format("classifier").network_from_checkpoint(file.raw, where)
        for key, given in (("model_name", spec.name), ("num_classes", spec.num_classes)):
            if given is not None and given != info[key]:
                raise ValueError(f"source.{'name' if key == 'model_name' else key}={given!r} disagrees with the "
                                 f"checkpoint's {info[key]!r}; leave it unset for an ImageClassifier checkpoint.")
        return TimmClassifier(net), {"kind": "classifier", **info, "classifier_hparams": file.raw["hyper_parameters"]}, file
    if spec.name is None or spec.num_classes is None:
        raise ValueError("source.kind timm needs source.name (a timm model) and source.num_classes: the checkpoint "
                         "is not an ImageClassifier checkpoint (or none was given), so they cannot be read from it.")
    from mmalign.models.timm_models import create_timm_model

    net = create_timm_model(spec.name, spec.num_classes, False, None, **dict(spec.kwargs))
    if file is None:
        import sys

        print("[tta] source.checkpoint is null: using RANDOM weights (smoke test only).", file=sys.stderr)
    else:
        _load_plain_weights(net, file, where)
    return TimmClassifier(net), {"kind": "timm", "model_name": spec.name, "num_classes": spec.num_classes,
                                 "model_kwargs": dict(spec.kwargs)}, file


def _load_plain_weights(net: nn.Module, file: SourceFile, where: str) -> None:
    """timm/torchvision weights already read, unwrapped from the usual containers and prefixes the way
    ``mmalign.models.weights.load_weights`` does for a path."""
    from mmalign.models.weights import _WRAPPER_KEYS, _strip_prefixes

    sd = file.raw
    for key in _WRAPPER_KEYS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{where} holds no state dict of tensors.")
    own = net.state_dict()
    sd = _strip_prefixes(sd, set(own))
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or bad:
        raise ValueError(f"{where} does not fit timm model {type(net).__name__}: {len(missing)} missing {missing[:4]}, "
                         f"{len(unexpected)} unexpected {unexpected[:4]}, {len(bad)} of another shape {bad[:4]}. "
                         "Check source.name and source.kwargs match the weights.")
    net.load_state_dict(sd)
