"""Default image transforms, used when no model supplied its own through ``Preprocess``."""

from __future__ import annotations

from collections.abc import Sequence


def default_image_transform(image_size: int, train: bool, mean: Sequence[float] = (0.5, 0.5, 0.5),
                            std: Sequence[float] = (0.5, 0.5, 0.5), augment: bool = True):
    """Resize + (random|center) crop + tensor + normalise. ``augment`` adds a mild random resized
    crop (scale 0.7-1: small synthetic images lose their object under ImageNet's 0.08)."""
    from torchvision import transforms as T

    if train and augment:
        crop = T.RandomResizedCrop(image_size, scale=(0.7, 1.0), antialias=True)
        return T.Compose([crop, T.ToTensor(), T.Normalize(mean, std)])
    return T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean, std)])
