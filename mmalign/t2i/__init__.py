"""Text-to-image flow matching conditioned on captions (MMDiT or cross-attention U-Net from diffusers), SoftREPA
soft-token alignment on a trained checkpoint, and text-image alignment scoring with a CLIP judge.

Light on import (torch/lightning only): diffusers, transformers and open_clip load inside the builders.
"""

from .module import TextToImageDiffusion
from .specs import FDSpec, JudgeSpec, NetworkSpec, OptimSpec, SamplingSpec, SoftRepaSpec, T2ISpec, TextSpec

__all__ = ["FDSpec", "JudgeSpec", "NetworkSpec", "OptimSpec", "SamplingSpec", "SoftRepaSpec", "T2ISpec",
           "TextSpec", "TextToImageDiffusion"]
