"""Contrastive image-text pretraining: CLIP and SigLIP on open_clip models (open_clip imported lazily).

The LightningModules are imported on first use, so ``mmalign.contrastive.checkpoint`` and ``.specs``
(read by TTA sources, teachers and export) import no Lightning.
"""

__all__ = ["CLIP", "ContrastiveModule", "SigLIP"]


def __getattr__(name: str):
    if name in __all__:
        from . import module

        return getattr(module, name)
    raise AttributeError(f"module 'mmalign.contrastive' has no attribute {name!r}")
