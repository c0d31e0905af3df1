"""Losses of mmalign, one module per family (among them):

- ``mmalign.losses.contrastive``: CLIP (softmax InfoNCE) and SigLIP (pairwise sigmoid) image-text
  losses, exact under multi-process training, plus the learnable logit scale/bias helpers.
- ``mmalign.contrastive.feature_cache``: gradient accumulation that keeps every micro-batch's negatives.

Import from the submodules; this package deliberately imports nothing so that each loss family stays
independent and cheap to import.
"""
