"""Losses of mmalign, one module per family (among them):

- ``mmalign.losses.contrastive``: CLIP (softmax InfoNCE) and SigLIP (pairwise sigmoid) image-text
  losses, exact under multi-process training, plus the learnable logit scale/bias helpers.
- ``mmalign.losses.align_uniform``: alignment + uniformity (Wang and Isola), the same exactness across
  processes (uniformity over the global batch).
- ``mmalign.losses.tiled``: the same two losses computed in tiles recomputed in backward
  (``ClipLoss(tile_size=...)``/``SigLipLoss(tile_size=...)``), memory flat in the batch size.
- ``mmalign.contrastive.feature_cache``: gradient accumulation that keeps every micro-batch's negatives.

The names below are exported lazily (PEP 562): importing the package still imports nothing, so each
loss family stays independent and cheap to import, and ``from mmalign.losses import ClipLoss`` loads
only the module that defines it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AlignUniformLoss": "mmalign.losses.align_uniform",
    "ClipLoss": "mmalign.losses.contrastive",
    "SigLipLoss": "mmalign.losses.contrastive",
    "tiled_clip_loss": "mmalign.losses.tiled",
    "tiled_siglip_loss": "mmalign.losses.tiled",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the defining submodule on first access of an exported name."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmalign.losses' has no attribute {name!r}; exported: {__all__}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
