"""Supervised image classification on any timm model (also the source model for test-time adaptation).

``ImageClassifier`` is imported on first use, so ``mmalign.classify.checkpoint`` and ``.specs`` (read
by TTA sources and REPA teachers) import neither Lightning nor timm.
"""

__all__ = ["ImageClassifier"]


def __getattr__(name: str):
    if name == "ImageClassifier":
        from .module import ImageClassifier

        return ImageClassifier
    raise AttributeError(f"module 'mmalign.classify' has no attribute {name!r}")
