"""Specs shared by the diffusion methods (REPA / U-REPA and text-to-image): a frozen network from the teacher
registry, the Fréchet-distance evaluation and ``predict``'s sampler. Frozen dataclasses that check themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmalign.specs import need as _need

from .sampling import SAMPLERS


@dataclass(frozen=True)
class NetworkSpec:
    """A frozen image network from the teacher registry (``mmalign.encoders.build_teacher``).

    Args:
        kind: ``classifier`` (an ``ImageClassifier`` checkpoint: model name, kwargs, input size and
            normalisation are read from its saved hyper-parameters, so only ``checkpoint`` is
            given), ``timm`` (a timm model ``name`` plus a local weights file) or ``open_clip``
            (an open_clip image tower, or the image tower of an mmalign CLIP checkpoint: ``name`` is then
            read from it, and ``kwargs.trunk_kwargs`` rebuild a timm tower's trunk, e.g.
            ``{output_stride: 8}``), or any kind registered with ``register_teacher``.
        checkpoint: Local weights / checkpoint file (``timm`` / ``open_clip`` without it: random
            weights, smoke tests only).
        name: Model name for ``timm`` / ``open_clip``; for ``classifier``, if given, must match the checkpoint.
        kwargs: Builder arguments (``model_kwargs``, ``input_size``, ``mean``, ``std``, ``pretrained``);
            for ``classifier`` they override what the checkpoint says.
    """

    kind: str = "classifier"
    checkpoint: str | None = None
    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from mmalign.encoders import teacher_kinds

        kinds = teacher_kinds()
        _need(self.kind in kinds, f"network kind must be one of {kinds}, got '{self.kind}'.")

    def build(self, grid: int | None = None, where: str = "network"):
        """The frozen ``TeacherEncoder``; ``grid`` resizes its input to that token grid. What the kind
        needs is checked here, not at construction: a spec that is never built (FD off) may stay partial."""
        from mmalign.encoders import build_teacher

        if self.kind == "classifier":
            _need(self.checkpoint is not None,
                  f"{where}: kind 'classifier' reads the architecture from an ImageClassifier checkpoint, but "
                  f"{where}.checkpoint is null. Train one (python -m mmalign fit -c configs/repa/teacher_resnet_shapes.yaml "
                  f"for a teacher, configs/classify/shapes.yaml for the FD network) and set {where}.checkpoint to its "
                  "runs/mmalign/version_N/checkpoints/last.ckpt, or use kind: timm with a model name.")
        elif not (self.kind == "open_clip" and self.checkpoint):  # an mmalign CLIP checkpoint records its name
            _need(self.name is not None, f"{where}: kind '{self.kind}' needs {where}.name (the model name).")
        return build_teacher(self.kind, self.name, self.checkpoint, grid=grid, **self.kwargs)


@dataclass(frozen=True)
class FDSpec:
    """Frechet distance between generated and real images at every validation (logged ``val/fd``).

    Args:
        network: Feature network; null = the teacher's network (FD is then measured in the space the
            aligned runs were pulled toward: prefer an independent classifier).
        num_samples: Generated and real images per evaluation; 0 = no FD.
        sample_steps: Euler steps of the FD samples.
        cfg_scale: Guidance scale of the FD samples.
    """

    network: NetworkSpec | None = None
    num_samples: int = 0
    sample_steps: int = 20
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        _need(self.num_samples >= 0, f"fd.num_samples must be >= 0 (0 = no FD), got {self.num_samples}.")
        _need(self.sample_steps >= 1, f"fd.sample_steps must be >= 1, got {self.sample_steps}.")
        _need(self.cfg_scale >= 0, f"fd.cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}.")


@dataclass(frozen=True)
class SamplingSpec:
    """``predict``: PNG grids of samples from the EMA weights.

    Args:
        sampler: ``euler`` or ``heun`` (two evaluations per step).
        steps: ODE steps from noise (t = 1) to data (t = 0).
        cfg_scale: Classifier-free guidance scale (1 = none).
        guidance_interval: ``(lo, hi)``: guidance only for ``lo <= t <= hi`` (t = 1 is noise).
        num_samples: Images generated (labels cycle through the classes).
        out_dir: Folder of the PNG grids.
        grid_cols: Images per grid row.
    """

    sampler: Literal["euler", "heun"] = "heun"
    steps: int = 50
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    num_samples: int = 64
    out_dir: str = "samples"
    grid_cols: int = 8

    def __post_init__(self) -> None:
        _need(self.sampler in SAMPLERS, f"sampling.sampler must be one of {SAMPLERS}, got '{self.sampler}'.")
        _need(self.steps >= 1, f"sampling.steps must be >= 1, got {self.steps}.")
        _need(self.cfg_scale >= 0, f"sampling.cfg_scale must be >= 0 (1 = no guidance), got {self.cfg_scale}.")
        lo, hi = self.guidance_interval
        _need(0.0 <= lo <= hi <= 1.0, "sampling.guidance_interval must satisfy 0 <= lo <= hi <= 1 (t = 1 is noise), "
                                      f"got {tuple(self.guidance_interval)}.")
        _need(self.num_samples >= 1, f"sampling.num_samples must be >= 1, got {self.num_samples}.")
        _need(self.grid_cols >= 1, f"sampling.grid_cols must be >= 1, got {self.grid_cols}.")
