"""The image transform of the diffusion methods."""

from __future__ import annotations


def diffusion_transform(image_size: int):
    """Resize + center crop + ``[-1, 1]`` tensor; no augmentation (REPA flips in the module, so that
    precomputed teacher features can follow the flip; text-to-image does not flip: captions name positions)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
