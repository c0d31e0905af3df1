"""Contrastive image-text pretraining: CLIP and SigLIP on open_clip models (open_clip imported lazily)."""

from .module import CLIP, ContrastiveModule, SigLIP

__all__ = ["CLIP", "ContrastiveModule", "SigLIP"]
