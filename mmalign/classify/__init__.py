"""Supervised image classification on any timm model (also the source model for test-time adaptation)."""

from .module import ImageClassifier

__all__ = ["ImageClassifier"]
