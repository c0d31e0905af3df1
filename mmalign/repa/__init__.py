"""REPA / U-REPA: flow-matching diffusion on diffusers backbones aligned to frozen teachers.

Light on import (torch/lightning only): diffusers, timm and open_clip load inside the builders.
"""

from . import precompute_command  # noqa: F401  (registers `mmalign precompute_teacher`)
from .module import FlowMatchingDiffusion

__all__ = ["FlowMatchingDiffusion"]
