"""REPA / U-REPA: flow-matching diffusion on diffusers backbones aligned to frozen teachers.

Light on import (torch/lightning only): diffusers, timm and open_clip load inside the builders.
"""

from .module import FlowMatchingDiffusion
from .specs import AlignSpec, DiffusionSpec, FDSpec, NetworkSpec, OptimSpec, SamplingSpec, TeacherSpec

__all__ = ["AlignSpec", "DiffusionSpec", "FDSpec", "FlowMatchingDiffusion", "NetworkSpec", "OptimSpec", "SamplingSpec",
           "TeacherSpec"]
