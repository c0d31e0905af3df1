"""The options of ``ImageClassifier``, grouped into frozen specs.

``ImageClassifier(network, num_classes, transform, optim, loss, compile)``; in YAML each spec is a
mapping under ``model.init_args`` (``--model.init_args.network.name=resnet50``). ``num_classes`` stays
a top-level option: it is the task's label space, which the data section copies
(``num_classes: ${model.init_args.num_classes}``). ``mmalign.checkpoint_layout.CLASSIFIER_MOVED`` sends
every option of the older flat signature to its new place (CLI hint, old checkpoints).

Plain stdlib + ``mmalign.specs``: importable without Lightning or timm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmalign.specs import OptimSpec, need, positive, unit_interval

CLASSIFIER_OPTIM = OptimSpec(lr=1e-3, weight_decay=0.05)


@dataclass(frozen=True)
class TimmNetworkSpec:
    """The timm network and its starting weights.

    Args:
        name: timm model name (``timm.list_models()``); unknown names list close matches.
        pretrained: Use timm's pretrained tag (needs the weights in the local HF cache).
        checkpoint_path: Local weights file (timm/torchvision state dict, Lightning checkpoint or
            safetensors). A head of another class count is re-initialised.
        kwargs: Extra arguments of the timm constructor (e.g. ``layers``, ``channels``, ``drop_rate``).
    """

    name: str = "resnet18"
    pretrained: bool = False
    checkpoint_path: str | None = None
    kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        need(isinstance(self.name, str) and bool(self.name), f"network.name must be a timm model name, got {self.name!r}.")


@dataclass(frozen=True)
class TransformSpec:
    """The image transforms this model hands to the datamodule.

    Args:
        image_size: Input side (resize + crop).
        mean: Normalisation mean (timm's ImageNet default).
        std: Normalisation std.
        augment: Random resized crop (scale 0.7-1) during training.
    """

    image_size: int = 64
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    augment: bool = True

    def __post_init__(self) -> None:
        positive("transform.image_size", self.image_size)
        for name in ("mean", "std"):
            value = tuple(getattr(self, name))
            need(len(value) == 3, f"transform.{name} must be three numbers (R, G, B), got {value}.")
        for i, s in enumerate(self.std):
            positive(f"transform.std[{i}]", s)


@dataclass(frozen=True)
class ClassifierLossSpec:
    """Cross-entropy.

    Args:
        label_smoothing: Label smoothing of the training loss (evaluation uses none).
    """

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        unit_interval("loss.label_smoothing", self.label_smoothing)


def check_num_classes(num_classes: Any) -> None:
    need(isinstance(num_classes, int) and num_classes >= 2, f"num_classes must be an int >= 2, got {num_classes!r}.")
