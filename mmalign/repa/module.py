"""``FlowMatchingDiffusion``: class-conditional flow matching with optional REPA / U-REPA alignment.

Objective (REPA's SiT setting): ``x_t = (1 - t) x + t eps``, ``t ~ U(0, 1)``, the network predicts
the velocity ``eps - x`` under MSE. Labels are dropped to the null class with probability
``label_dropout`` so one network gives both terms of classifier-free guidance.

Alignment: a forward hook on the backbone captures the hidden states at ``hook_point`` during the
same forward that computes the velocity loss (no second pass), an ``AlignmentHead`` projects them
to the teacher width (U-REPA: then upsamples to the teacher grid), and
``L = L_velocity + align_lambda * (L_cos + manifold_weight * L_manifold)``.

The teacher and the FD network live outside the module tree (plain ``__dict__`` entries): they are
not in ``state_dict``, ``parameters()``, the optimizer, the EMA or DDP's gradient buckets, and are
moved to the module's device on use.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from datamodules.base import Preprocess
from mmalign.optim import warmup_cosine
from mmalign.distributed import get_rank, get_world_size

from .alignment import MANIFOLD_MODES, AlignmentHead, HookCapture, manifold_loss, repa_cosine_loss
from .backbones import DiffusionBackbone, probe_hook
from .ema import EMA
from .sampling import SAMPLERS, sample

log = logging.getLogger(__name__)
ALIGN_MODES = ("none", "repa", "urepa")


def diffusion_transform(image_size: int):
    """Resize + center crop + ``[-1, 1]`` tensor; no augmentation (the module flips, so that
    precomputed teacher features can follow the flip)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


class FlowMatchingDiffusion(pl.LightningModule):
    """Class-conditional flow-matching diffusion on a diffusers backbone, with REPA / U-REPA.

    Args:
        backbone: ``dit`` (``DiTTransformer2DModel``) or ``unet`` (``UNet2DModel``).
        backbone_kwargs: diffusers constructor overrides (``num_layers``, ``patch_size``,
            ``num_attention_heads``, ``attention_head_dim`` / ``block_out_channels`` ...).
        image_size: Pixel side of the training images (32-64 px by default settings).
        num_classes: Classes of the labels (``[0, num_classes)``); index ``num_classes`` is the null class.
        label_dropout: Probability of replacing a label by the null class (CFG training).
        align: ``none``, ``repa`` (cosine at ``hook_point``) or ``urepa`` (cosine + manifold, with
            the projected grid upsampled to ``align_grid``).
        hook_point: Backbone module whose output is aligned (``transformer_blocks.<i>``,
            ``mid_block``, ``down_blocks.<i>``, ``up_blocks.<i>``); default: block ~depth/3 for the
            DiT, ``mid_block`` for the U-Net.
        align_grid: Token grid the projection and teacher are compared at. Default: the hook's own
            grid for ``repa``, twice it for ``urepa`` (the paper's 8x8 -> 16x16 upsampling).
        align_lambda: Weight ``lambda`` of the alignment loss (REPA 0.5; U-REPA 0.25-0.5).
        manifold_weight: ``w`` of the U-REPA manifold loss (paper 3); 0 = cosine only.
        manifold_mode: ``token`` (N x N within each image) or ``sample`` (B x B across the batch).
        align_until_step: Stop alignment (and the teacher forward) from this global step on.
        projector_dim: Hidden width of the 3-layer projector (REPA 2048).
        teacher_kind, teacher_name, teacher_checkpoint, teacher_kwargs: Teacher from the registry
            (``mmalign.encoders.build_teacher``), e.g. ``timm`` + ``vit_small_patch14_dinov2`` + a
            local file. Needed when ``align != none``.
        teacher_interpolate_tokens: Run the teacher at its native grid and bilinearly interpolate
            its tokens to ``align_grid`` instead of resizing its input.
        teacher_features: Directory of precomputed teacher features (``mmalign precompute_teacher``);
            the teacher is then not run during training.
        fd_kind, fd_name, fd_checkpoint, fd_kwargs: FD feature network from the teacher registry;
            default: the teacher's settings.
        fd_num_samples: Generated (and real) images per FD evaluation, run at each validation; 0 = off.
        fd_sample_steps, fd_cfg_scale: Sampler steps and guidance of the FD samples.
        sampler, sample_steps, cfg_scale, guidance_interval: ``predict`` sampling settings.
        predict_num_samples, predict_dir, predict_grid_cols: ``predict`` writes PNG grids here.
        hflip: Random horizontal flip of training images (done in the module).
        vae_path: Local diffusers ``AutoencoderKL`` directory: train in its latent space.
        vae_scale: Latent scale; default the VAE's ``scaling_factor``.
        ema_decay: EMA decay of the sampling weights.
        lr, weight_decay, betas, warmup_steps: AdamW with linear warm-up then constant LR.
        grad_clip: Gradient-norm clip (used when the trainer sets none).
    """

    def __init__(
        self,
        backbone: Literal["dit", "unet"] = "dit",
        backbone_kwargs: dict[str, Any] | None = None,
        image_size: int = 32,
        num_classes: int = 36,
        label_dropout: float = 0.1,
        align: Literal["none", "repa", "urepa"] = "none",
        hook_point: str | None = None,
        align_grid: int | None = None,
        align_lambda: float = 0.5,
        manifold_weight: float = 3.0,
        manifold_mode: Literal["token", "sample"] = "token",
        align_until_step: int | None = None,
        projector_dim: int = 2048,
        teacher_kind: str = "timm",
        teacher_name: str | None = None,
        teacher_checkpoint: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        teacher_interpolate_tokens: bool = False,
        teacher_features: str | None = None,
        fd_kind: str | None = None,
        fd_name: str | None = None,
        fd_checkpoint: str | None = None,
        fd_kwargs: dict[str, Any] | None = None,
        fd_num_samples: int = 0,
        fd_sample_steps: int = 20,
        fd_cfg_scale: float = 1.0,
        sampler: Literal["euler", "heun"] = "heun",
        sample_steps: int = 50,
        cfg_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        predict_num_samples: int = 64,
        predict_dir: str = "samples",
        predict_grid_cols: int = 8,
        hflip: bool = True,
        vae_path: str | None = None,
        vae_scale: float | None = None,
        ema_decay: float = 0.999,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        grad_clip: float = 1.0,
    ) -> None:
        super().__init__()
        if align not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES}, got '{align}'.")
        if manifold_mode not in MANIFOLD_MODES:
            raise ValueError(f"manifold_mode must be one of {MANIFOLD_MODES}, got '{manifold_mode}'.")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got '{sampler}'.")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}.")
        lo, hi = guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1 (t = 1 is noise), got {guidance_interval}.")
        if align != "none" and teacher_name is None and teacher_features is None:
            raise ValueError(f"align='{align}' needs a teacher: set teacher_name (and teacher_checkpoint) or teacher_features.")
        if fd_num_samples and (fd_name or teacher_name) is None:
            raise ValueError("fd_num_samples > 0 needs an FD feature network: set fd_name (or teacher_name).")
        self.save_hyperparameters()

        self.__dict__["_vae"] = self._load_vae(vae_path) if vae_path else None
        channels, size = 3, image_size
        if self._vae is not None:
            channels = int(self._vae.config.latent_channels)
            size = image_size // (2 ** (len(self._vae.config.block_out_channels) - 1))
            self.latent_scale = float(vae_scale if vae_scale is not None else self._vae.config.scaling_factor)
        self.backbone = DiffusionBackbone(backbone, size, channels, num_classes, **(backbone_kwargs or {}))
        self.ema = EMA(self.backbone, ema_decay)  # before the hook: deepcopy would copy it
        self.__dict__["_teacher"] = None
        self.__dict__["_capture"] = None
        self.__dict__["_feature_store"] = None
        self.head = None
        if align != "none":
            self._setup_alignment()
        self.__dict__["_fd"] = None
        self.fd_network = None
        if fd_num_samples:
            from .fid import build_fd_metric

            self.__dict__["_fd"], self.fd_network = build_fd_metric(
                fd_kind or teacher_kind, fd_name or teacher_name,
                fd_checkpoint if fd_name else (fd_checkpoint or teacher_checkpoint),
                fd_kwargs if fd_kwargs is not None else (None if fd_name else teacher_kwargs))
            log.info("FD feature network: %s", self.fd_network)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _load_vae(path: str):
        from diffusers import AutoencoderKL

        if not os.path.isdir(path):
            raise FileNotFoundError(f"vae_path '{path}' is not a directory; give a local diffusers AutoencoderKL "
                                    "folder (config.json + weights), saved with save_pretrained.")
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True).eval()
        vae.requires_grad_(False)
        return vae

    def _setup_alignment(self) -> None:
        h = self.hparams
        name = h.hook_point or self.backbone.default_hook_point()
        module = self.backbone.hook_module(name)  # HookPointError lists valid names
        shape = probe_hook(self.backbone, module)
        width = shape[1] if len(shape) == 4 else shape[-1]
        side = shape[-1] if len(shape) == 4 else math.isqrt(shape[1])
        grid = h.align_grid or (2 * side if h.align == "urepa" else side)
        self.hook_name, self.hook_grid, self.align_grid = name, side, grid
        if h.teacher_features:
            from .features import FeatureStore

            store = FeatureStore(h.teacher_features)
            store.check(grid)
            self.__dict__["_feature_store"] = store
            dim = store.dim
            self.teacher_description = store.description
        else:
            from mmalign.encoders import build_teacher

            teacher = build_teacher(h.teacher_kind, h.teacher_name, h.teacher_checkpoint,
                                    grid=None if h.teacher_interpolate_tokens else grid, **(h.teacher_kwargs or {}))
            self.__dict__["_teacher"] = teacher
            dim = teacher.embed_dim
            self.teacher_description = teacher.describe()
        self.head = AlignmentHead(width, h.projector_dim, dim, grid)
        self.__dict__["_capture"] = HookCapture(module)
        log.info("alignment %s at %s (%dx%d grid -> %dx%d), teacher %s", h.align, name, side, side, grid, grid,
                 self.teacher_description)

    @property
    def preprocess(self) -> Preprocess:
        t = diffusion_transform(self.hparams.image_size)
        return Preprocess(train_transform=t, eval_transform=t)

    def _aux_to_device(self) -> None:
        for key in ("_teacher", "_fd", "_vae"):
            obj = self.__dict__.get(key)
            if obj is not None:
                obj.to(self.device)

    def on_fit_start(self) -> None:
        self._aux_to_device()

    def on_validation_start(self) -> None:
        self._aux_to_device()

    def on_predict_start(self) -> None:
        self._aux_to_device()

    # ------------------------------------------------------------------ helpers
    def _check_labels(self, labels: torch.Tensor) -> None:
        n = self.hparams.num_classes
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            bad = int(labels.max()) if int(labels.max()) >= n else int(labels.min())
            raise ValueError(f"class label {bad} is outside [0, {n}): set num_classes to cover the data "
                             "(the null class num_classes is reserved for guidance) or fix the datamodule's label_key.")

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        if self._vae is None:
            return images
        return self._vae.encode(images).latent_dist.sample() * self.latent_scale

    @torch.no_grad()
    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        if self._vae is None:
            return x
        return self._vae.decode(x / self.latent_scale).sample

    def _align_active(self) -> bool:
        until = self.hparams.align_until_step
        return self.head is not None and (until is None or self.global_step < until)

    def _targets(self, batch: dict, images: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        if self._feature_store is not None:
            return self._feature_store.lookup(batch["key"], flipped).to(self.device)
        grid = self.align_grid if self.hparams.teacher_interpolate_tokens else None
        return self._teacher.encode(images, grid=grid)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, ema: bool = False) -> torch.Tensor:
        return (self.ema if ema else self.backbone)(x, t, labels)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h = self.hparams
        images, labels = batch["image"], batch["label"]
        self._check_labels(labels)
        b = images.shape[0]
        flipped = torch.zeros(b, dtype=torch.bool, device=images.device)
        if h.hflip:
            flipped = torch.rand(b, device=images.device) < 0.5
            images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
        align = self._align_active()
        target = self._targets(batch, images, flipped) if align else None
        x = self._encode(images)
        noise = torch.randn_like(x)
        t = torch.rand(b, device=x.device)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x + tb * noise
        drop = torch.rand(b, device=x.device) < h.label_dropout
        cond = torch.where(drop, torch.full_like(labels, self.backbone.null_class), labels)
        capture = self._capture
        if capture is not None:
            capture.active = align
        try:
            pred = self.backbone(x_t, t, cond)
        finally:
            if capture is not None:
                capture.active = False
        loss_v = F.mse_loss(pred.float(), (noise - x).float())
        loss = loss_v
        self.log("train/loss_velocity", loss_v, prog_bar=True, batch_size=b)
        if align:
            proj = self.head(capture.pop())
            loss_cos = repa_cosine_loss(proj, target)
            self.log("train/loss_cos", loss_cos, batch_size=b)
            align_loss = loss_cos
            if h.align == "urepa" and h.manifold_weight > 0:
                loss_man = manifold_loss(proj, target, h.manifold_mode)
                self.log("train/loss_manifold", loss_man, batch_size=b)
                align_loss = align_loss + h.manifold_weight * loss_man
            loss = loss + h.align_lambda * align_loss
        self.log("train/loss", loss, batch_size=b)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update(self.backbone, self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        val = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip
        if val:
            self.clip_gradients(optimizer, gradient_clip_val=val, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.backbone.parameters()) + (list(self.head.parameters()) if self.head is not None else [])
        return [p for p in params if p.requires_grad]

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas))
        # DiT/SiT train at constant LR; warm-up only (min_ratio 1 keeps the cosine flat)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(h.warmup_steps, 1, min_ratio=1.0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict, prefix: str) -> None:
        images, labels = batch["image"], batch["label"]
        self._check_labels(labels)
        x = self._encode(images)
        # fixed noise and a fixed t grid: comparable numbers between evaluations
        g = torch.Generator(device="cpu").manual_seed(1234)
        noise = torch.randn(x.shape, generator=g).to(x)
        t = (torch.arange(x.shape[0], device=x.device).float() + 0.5) / x.shape[0]
        tb = t.view(-1, 1, 1, 1)
        pred = self.velocity((1 - tb) * x + tb * noise, t, labels, ema=True)
        self.log(f"{prefix}/loss_velocity", F.mse_loss(pred.float(), (noise - x).float()), batch_size=len(labels),
                 sync_dist=True)
        fd = self._fd
        if fd is not None and not self.trainer.sanity_checking:
            need = math.ceil(self.hparams.fd_num_samples / get_world_size()) - int(fd.real_features_num_samples)
            if need > 0:
                from .fid import to_unit

                fd.update(to_unit(images[:need]), real=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, steps: int, method: str, cfg_scale: float,
                 interval: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> torch.Tensor:
        """Images in ``[-1, 1]`` for ``labels`` from the EMA weights (noise seeded: same every call)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        bb = self.backbone
        noise = torch.randn((len(labels), bb.in_channels, bb.image_size, bb.image_size), generator=g).to(self.device)
        x = sample(lambda x, t, y: self.velocity(x, t, y, ema=True), noise, labels, bb.null_class, steps, method,
                   cfg_scale, interval)
        return self._decode(x).clamp(-1, 1)

    def _fd_epoch_end(self, prefix: str) -> None:
        fd = self._fd
        if fd is None or self.trainer.sanity_checking or int(fd.real_features_num_samples) < 2:
            return
        from .fid import to_unit

        h = self.hparams
        n = math.ceil(h.fd_num_samples / get_world_size())
        rank = get_rank()
        bs = 256
        for start in range(0, n, bs):
            labels = (torch.arange(start, min(n, start + bs), device=self.device) + rank * n) % h.num_classes
            imgs = self.generate(labels, h.fd_sample_steps, "euler", h.fd_cfg_scale, seed=10_000 * rank + start)
            fd.update(to_unit(imgs), real=False)
        value = fd.compute()
        fd.reset()  # fake statistics only: reset_real_features=False
        self.log(f"{prefix}/fd", value, sync_dist=False)
        log.info("step %d %s/fd = %.4f (%s)", self.global_step, prefix, float(value), self.fd_network)

    def on_validation_epoch_end(self) -> None:
        self._fd_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._fd_epoch_end("test")

    # ------------------------------------------------------------------ predict
    def predict_dataloader(self):
        n, c = self.hparams.predict_num_samples, self.hparams.num_classes
        labels = torch.arange(n) % c
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(labels), batch_size=max(1, min(n, 64)))

    def predict_step(self, batch, batch_idx: int) -> dict:
        from torchvision.utils import save_image

        h = self.hparams
        labels = (batch[0] if isinstance(batch, (list, tuple)) else batch["label"]).to(self.device)
        self._check_labels(labels)
        imgs = self.generate(labels, h.sample_steps, h.sampler, h.cfg_scale, tuple(h.guidance_interval),
                             seed=batch_idx + 1000 * get_rank())
        os.makedirs(h.predict_dir, exist_ok=True)
        path = os.path.join(h.predict_dir, f"samples_rank{get_rank()}_{batch_idx:04d}.png")
        save_image((imgs + 1) / 2, path, nrow=h.predict_grid_cols)
        return {"path": path, "labels": labels.cpu()}
