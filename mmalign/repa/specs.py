"""The options of ``FlowMatchingDiffusion``, grouped by concern into small frozen dataclasses (``NetworkSpec``,
``FDSpec`` and ``SamplingSpec`` are the diffusion core's, shared with text-to-image).

Each spec checks its own values in ``__post_init__`` (the error names the field, the bad value and
what is allowed); ``RepaConfig`` checks the combinations (alignment needs a teacher, FD needs a
feature network). In a YAML config every spec is a nested mapping under ``model.init_args``
(jsonargparse builds the dataclass), e.g. ``--model.init_args.align.weight=0.25``. Specs are frozen
so a default instance can be shared by every signature that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmalign.specs import OptimSpec, coerce
from mmalign.specs import need as _need
from mmalign.specs import unit_interval as _unit_interval

from mmalign.diffusion.specs import FDSpec, NetworkSpec, SamplingSpec

from .losses import MANIFOLD_MODES

#: REPA trains at a constant rate after warm-up with gradient clipping (DiT/SiT practice)
REPA_OPTIM = OptimSpec(lr=1e-4, schedule="constant", grad_clip=1.0)

BACKBONES = ("dit", "unet")
ALIGN_MODES = ("none", "repa", "urepa")


@dataclass(frozen=True)
class DiffusionSpec:
    """What is generated and by which network.

    Args:
        backbone: ``dit`` (diffusers ``DiTTransformer2DModel``) or ``unet`` (``UNet2DModel``).
        backbone_kwargs: diffusers constructor overrides (``num_layers``, ``patch_size``,
            ``num_attention_heads``, ``attention_head_dim`` / ``block_out_channels`` ...).
        image_size: Pixel side of the training images.
        num_classes: Label classes ``[0, num_classes)``; index ``num_classes`` is the null class of CFG.
        label_dropout: Probability of replacing a label by the null class (one network, both CFG terms).
        hflip: Random horizontal flip, done in the module so precomputed teacher features can follow it.
        vae_path: Local diffusers ``AutoencoderKL`` folder: train in its latent space (frozen, not saved).
        vae_scale: Latent scale; default the VAE's ``scaling_factor``.
        ema_decay: Decay of the EMA of the backbone weights that evaluation and sampling use.
    """

    backbone: Literal["dit", "unet"] = "dit"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 32
    num_classes: int = 36
    label_dropout: float = 0.1
    hflip: bool = True
    vae_path: str | None = None
    vae_scale: float | None = None
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        _need(self.backbone in BACKBONES, f"diffusion.backbone must be one of {BACKBONES}, got '{self.backbone}'.")
        _need(self.image_size >= 8, f"diffusion.image_size must be >= 8 pixels, got {self.image_size}.")
        _need(self.num_classes >= 1, f"diffusion.num_classes must be >= 1, got {self.num_classes}.")
        _unit_interval("diffusion.label_dropout", self.label_dropout)
        _need(self.vae_scale is None or self.vae_scale > 0,
              f"diffusion.vae_scale must be > 0 (or null for the VAE's scaling_factor), got {self.vae_scale}.")
        _unit_interval("diffusion.ema_decay", self.ema_decay)


@dataclass(frozen=True)
class AlignSpec:
    """REPA / U-REPA: which hidden states are pulled toward the teacher's tokens, and how hard.

    ``L = L_velocity + weight * (L_cos + manifold_weight * L_manifold)``; ``L_manifold`` only for ``urepa``.

    Args:
        mode: ``none``; ``repa`` (negative cosine at ``hook_point``); ``urepa`` (cosine + manifold
            loss, the projected grid upsampled to ``grid``).
        hook_point: Backbone module whose output is aligned (``transformer_blocks.<i>``,
            ``mid_block``, ``down_blocks.<i>``, ``up_blocks.<i>``); default: block ~depth/3 for the
            DiT (REPA: 8 of 28), ``mid_block`` for the U-Net (U-REPA).
        grid: Token grid projection and teacher are compared on; default the hook's own grid for
            ``repa``, twice it for ``urepa`` (the paper's 8x8 -> 16x16).
        weight: ``lambda`` of the alignment loss (REPA 0.5; U-REPA 0.25-0.5).
        manifold_weight: ``w`` of the U-REPA manifold loss (paper 3); 0 = cosine only.
        manifold_mode: ``token`` (N x N within each image) or ``sample`` (B x B across the batch).
        until_step: Stop aligning (and running the teacher) from this global step on; null = never.
        projector_dim: Hidden width of the 3-layer projector (REPA 2048).
    """

    mode: Literal["none", "repa", "urepa"] = "none"
    hook_point: str | None = None
    grid: int | None = None
    weight: float = 0.5
    manifold_weight: float = 3.0
    manifold_mode: Literal["token", "sample"] = "token"
    until_step: int | None = None
    projector_dim: int = 2048

    def __post_init__(self) -> None:
        _need(self.mode in ALIGN_MODES, f"align.mode must be one of {ALIGN_MODES}, got '{self.mode}'.")
        _need(self.manifold_mode in MANIFOLD_MODES,
              f"align.manifold_mode must be one of {MANIFOLD_MODES}, got '{self.manifold_mode}'.")
        _need(self.weight >= 0, f"align.weight (lambda) must be >= 0, got {self.weight}.")
        _need(self.manifold_weight >= 0, f"align.manifold_weight must be >= 0 (0 = cosine only), got "
                                         f"{self.manifold_weight}.")
        _need(self.grid is None or self.grid >= 1, f"align.grid must be >= 1 or null (automatic), got {self.grid}.")
        _need(self.until_step is None or self.until_step >= 0,
              f"align.until_step must be >= 0 or null (align throughout), got {self.until_step}.")
        _need(self.projector_dim >= 1, f"align.projector_dim must be >= 1, got {self.projector_dim}.")

    @property
    def active(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class TeacherSpec(NetworkSpec):
    """The alignment teacher: a registry network, or its tokens precomputed to files.

    Args:
        interpolate_tokens: Run the teacher at its native grid and bilinearly interpolate its
            tokens to the alignment grid, instead of resizing its input (CNNs with coarse maps,
            token-mixing models whose grid is fixed).
        features: Directory of precomputed teacher tokens (``mmalign precompute_teacher``); the
            teacher network is then neither built nor run, and kind/checkpoint/name are unused.
    """

    interpolate_tokens: bool = False
    features: str | None = None


@dataclass(frozen=True)
class RepaConfig:
    """All specs of one model, with the checks that involve more than one of them."""

    diffusion: DiffusionSpec
    align: AlignSpec
    teacher: TeacherSpec | None
    fd: FDSpec
    sampling: SamplingSpec
    optim: OptimSpec

    @classmethod
    def build(cls, diffusion, align, teacher, fd, sampling, optim) -> "RepaConfig":
        return cls(coerce(diffusion, DiffusionSpec, "diffusion"), coerce(align, AlignSpec, "align"),
                   None if teacher is None else coerce(teacher, TeacherSpec, "teacher"), coerce(fd, FDSpec, "fd"),
                   coerce(sampling, SamplingSpec, "sampling"),
                   REPA_OPTIM if optim is None else coerce(optim, OptimSpec, "optim"))

    def __post_init__(self) -> None:
        if self.align.active:
            _need(self.teacher is not None,
                  f"align.mode='{self.align.mode}' needs a teacher: set teacher.checkpoint (kind classifier: an "
                  "ImageClassifier checkpoint), teacher.kind + teacher.name (timm / open_clip) or teacher.features.")
        if self.fd.num_samples:
            _need(self.fd_network is not None,
                  "fd.num_samples > 0 needs an FD feature network: set fd.network (e.g. {kind: classifier, "
                  "checkpoint: ...}) or a teacher network (a precomputed teacher has none), or fd.num_samples: 0.")

    @property
    def fd_network(self) -> NetworkSpec | None:
        """The FD feature network: ``fd.network``, else the teacher's (none for precomputed features)."""
        if self.fd.network is not None:
            return self.fd.network
        t = self.teacher
        if t is None or t.features is not None:
            return None
        return NetworkSpec(t.kind, t.checkpoint, t.name, dict(t.kwargs))
