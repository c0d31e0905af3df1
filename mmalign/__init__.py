"""mmalign: multimodal representation alignment on PyTorch Lightning.

Kept import-free on purpose: ``python -m mmalign --help`` must not pull in open_clip or diffusers.
"""

__version__ = "0.1.0"
