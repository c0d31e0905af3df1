"""``FlowMatchingDiffusion``: class-conditional flow matching with optional REPA / U-REPA alignment.

Objective (REPA's SiT setting): ``x_t = (1 - t) x + t eps``, ``t ~ U(0, 1)``, the network predicts
the velocity ``eps - x`` under MSE. Labels are dropped to the null class with probability
``label_dropout`` so one network gives both terms of classifier-free guidance.

Alignment: a forward hook on the backbone captures the hidden states at ``align.hook_point``
during the same forward that computes the velocity loss (no second pass), an ``AlignmentHead``
projects them to the teacher width (U-REPA: then upsamples to the teacher grid), and
``L = L_velocity + weight * (L_cos + manifold_weight * L_manifold)``.

The teacher, the FD network and the VAE are frozen registered submodules (``mmalign.diffusion.frozen``): moved by
Lightning, outside the optimizer, the EMA and the checkpoint. The options are the specs of
``specs.py``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, is_dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from datamodules.base import Preprocess
from mmalign.distributed import get_rank
from mmalign.models import compile_in_place

from mmalign.diffusion.ema import EMA
from mmalign.diffusion.frozen import FrozenChildren, load_vae
from mmalign.diffusion.sampling import sample
from mmalign.diffusion.transforms import diffusion_transform

from .backbones import DiffusionBackbone, HookCapture, probe_hook
from .losses import manifold_loss, repa_cosine_loss
from .projector import AlignmentHead
from .specs import REPA_OPTIM, AlignSpec, DiffusionSpec, FDSpec, OptimSpec, RepaConfig, SamplingSpec, TeacherSpec

log = logging.getLogger(__name__)


class FlowMatchingDiffusion(FrozenChildren, pl.LightningModule):
    """Class-conditional flow-matching diffusion on a diffusers backbone, with REPA / U-REPA.

    Args:
        diffusion: Backbone, image size, classes, label dropout, flip, VAE (``DiffusionSpec``).
        align: Alignment mode, hook point, grid, lambda, manifold loss, projector (``AlignSpec``).
        teacher: The frozen teacher (``TeacherSpec``): an ``ImageClassifier`` checkpoint, a
            timm / open_clip model, or precomputed features. Needed when ``align.mode != none``.
        fd: FD evaluation at every validation (``FDSpec``).
        sampling: ``predict`` sampler and PNG grids (``SamplingSpec``).
        optim: AdamW, warm-up, schedule (constant by default) and clipping (``mmalign.specs.OptimSpec``).
        compile: ``torch.compile`` the live backbone: ``true`` (inductor) or ``torch.compile``
            arguments; state-dict keys are unchanged, the EMA copy (sampling) stays eager.
    """

    frozen_children = ("teacher", "fd_metric", "vae")

    def __init__(
        self,
        diffusion: DiffusionSpec = DiffusionSpec(),
        align: AlignSpec = AlignSpec(),
        teacher: TeacherSpec | None = None,
        fd: FDSpec = FDSpec(),
        sampling: SamplingSpec = SamplingSpec(),
        optim: OptimSpec = REPA_OPTIM,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg = RepaConfig.build(diffusion, align, teacher, fd, sampling, optim)
        self.save_hyperparameters()
        # the complete specs as plain containers: checkpoints are read back with weights_only=True, and
        # load_from_checkpoint passes these mappings back to the constructor
        for store in (self._hparams, self._hparams_initial):
            for key in ("diffusion", "align", "teacher", "fd", "sampling", "optim"):
                spec = getattr(cfg, key)
                store[key] = asdict(spec) if is_dataclass(spec) else spec
        d = cfg.diffusion
        self.vae = load_vae(d.vae_path) if d.vae_path else None
        channels, size = 3, d.image_size
        if self.vae is not None:
            channels = int(self.vae.config.latent_channels)
            size = d.image_size // (2 ** (len(self.vae.config.block_out_channels) - 1))
            self.latent_scale = float(d.vae_scale if d.vae_scale is not None else self.vae.config.scaling_factor)
        self.backbone = DiffusionBackbone(d.backbone, size, channels, d.num_classes, **d.backbone_kwargs)
        self.ema = EMA(self.backbone, cfg.diffusion.ema_decay)  # before the hook: deepcopy would copy it
        self.teacher = self.head = self._capture = self._feature_store = None
        self.teacher_description = self.hook_name = None
        if cfg.align.active:
            self._setup_alignment()
        self.fd_metric, self.fd_network = None, None
        if cfg.fd.num_samples:
            from mmalign.diffusion.fid import build_fd_metric

            self.fd_metric, self.fd_network = build_fd_metric(cfg.fd_network, "fd.network" if cfg.fd.network else "teacher")
            log.info("FD feature network: %s", self.fd_network)
        compile_in_place(self.backbone, compile)  # after probe_hook: the probe runs eager

    # ------------------------------------------------------------------ set-up
    def _setup_alignment(self) -> None:
        a, t = self.cfg.align, self.cfg.teacher
        name = a.hook_point or self.backbone.default_hook_point()
        module = self.backbone.hook_module(name)  # HookPointError lists valid names
        shape = probe_hook(self.backbone, module)
        width = shape[1] if len(shape) == 4 else shape[-1]
        side = shape[-1] if len(shape) == 4 else math.isqrt(shape[1])
        grid = a.grid or (2 * side if a.mode == "urepa" else side)
        self.hook_name, self.hook_grid, self.align_grid = name, side, grid
        if t.features:
            from .features import FeatureStore

            self._feature_store = store = FeatureStore(t.features)
            store.check(grid)
            dim, self.teacher_description = store.dim, store.description
        else:
            self.teacher = t.build(None if t.interpolate_tokens else grid, "teacher")
            dim, self.teacher_description = self.teacher.embed_dim, self.teacher.describe()
        self.head = AlignmentHead(width, a.projector_dim, dim, grid)
        self._capture = HookCapture(module)
        log.info("alignment %s at %s (%dx%d grid -> %dx%d), teacher %s", a.mode, name, side, side, grid, grid,
                 self.teacher_description)

    @property
    def preprocess(self) -> Preprocess:
        t = diffusion_transform(self.cfg.diffusion.image_size)
        return Preprocess(train_transform=t, eval_transform=t)

    # ------------------------------------------------------------------ helpers
    def _check_labels(self, labels: torch.Tensor) -> None:
        n = self.cfg.diffusion.num_classes
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            bad = int(labels.max()) if int(labels.max()) >= n else int(labels.min())
            raise ValueError(f"class label {bad} is outside [0, {n}): set diffusion.num_classes to cover the data "
                             "(the null class num_classes is reserved for guidance) or fix the datamodule's label_key.")

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.vae is None else self.vae.encode(images).latent_dist.sample() * self.latent_scale

    @torch.no_grad()
    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.vae is None else self.vae.decode(x / self.latent_scale).sample

    def _align_active(self) -> bool:
        until = self.cfg.align.until_step
        return self.head is not None and (until is None or self.global_step < until)

    def _targets(self, batch: dict, images: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        if self._feature_store is not None:
            return self._feature_store.lookup(batch["key"], flipped).to(self.device)
        return self.teacher.encode(images, grid=self.align_grid if self.cfg.teacher.interpolate_tokens else None)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, ema: bool = False) -> torch.Tensor:
        return (self.ema if ema else self.backbone)(x, t, labels)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        d, a = self.cfg.diffusion, self.cfg.align
        images, labels = batch["image"], batch["label"]
        self._check_labels(labels)
        b = images.shape[0]
        flipped = torch.zeros(b, dtype=torch.bool, device=images.device)
        if d.hflip:
            flipped = torch.rand(b, device=images.device) < 0.5
            images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
        align = self._align_active()
        target = self._targets(batch, images, flipped) if align else None
        x = self._encode(images)
        noise = torch.randn_like(x)
        t = torch.rand(b, device=x.device)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x + tb * noise
        drop = torch.rand(b, device=x.device) < d.label_dropout
        cond = torch.where(drop, torch.full_like(labels, self.backbone.null_class), labels)
        capture = self._capture
        if capture is not None:
            capture.active = align
        try:
            pred = self.backbone(x_t, t, cond)
        finally:
            if capture is not None:
                capture.active = False
        loss = loss_v = F.mse_loss(pred.float(), (noise - x).float())
        self.log("train/loss_velocity", loss_v, prog_bar=True, batch_size=b)
        if align:
            proj = self.head(capture.pop())
            align_loss = loss_cos = repa_cosine_loss(proj, target)
            self.log("train/loss_cos", loss_cos, batch_size=b)
            if a.mode == "urepa" and a.manifold_weight > 0:
                loss_man = manifold_loss(proj, target, a.manifold_mode)
                self.log("train/loss_manifold", loss_man, batch_size=b)
                align_loss = align_loss + a.manifold_weight * loss_man
            loss = loss + a.weight * align_loss
        self.log("train/loss", loss, batch_size=b)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update(self.backbone, self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        val = gradient_clip_val if gradient_clip_val is not None else self.cfg.optim.grad_clip
        if val:
            self.clip_gradients(optimizer, gradient_clip_val=val, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.backbone.parameters()) + (list(self.head.parameters()) if self.head is not None else [])
        return [p for p in params if p.requires_grad]

    def configure_optimizers(self):
        # the backbone's decay rule (no decay on norms, biases, embeddings) as every other module
        named = [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]
        if self.head is not None:
            named += [(f"head.{n}", p) for n, p in self.head.named_parameters()]
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1  # unused by 'constant'
        return self.cfg.optim.build(named, total)

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
        if self.fd_metric is not None and not self.trainer.sanity_checking:
            from mmalign.diffusion.fid import add_real

            add_real(self.fd_metric, images, self.cfg.fd.num_samples)

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
        fd = self.fd_metric
        if fd is None or self.trainer.sanity_checking or int(fd.real_features_num_samples) < 2:
            return
        from mmalign.diffusion.fid import fd_of_samples

        spec = self.cfg.fd
        value = fd_of_samples(fd, lambda labels, seed: self.generate(labels, spec.sample_steps, "euler", spec.cfg_scale,
                                                                     seed=seed),
                              spec.num_samples, self.cfg.diffusion.num_classes, self.device)
        self.log(f"{prefix}/fd", value, sync_dist=False)
        log.info("step %d %s/fd = %.4f (%s)", self.global_step, prefix, float(value), self.fd_network)

    def on_validation_epoch_end(self) -> None:
        self._fd_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._fd_epoch_end("test")

    # ------------------------------------------------------------------ predict
    def predict_dataloader(self):
        n, c = self.cfg.sampling.num_samples, self.cfg.diffusion.num_classes
        labels = torch.arange(n) % c
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(labels), batch_size=max(1, min(n, 64)))

    def on_predict_start(self) -> None:
        from mmalign.training.outputs import check_output_dir

        # before the first image is sampled, not after the first batch's minutes of sampling
        check_output_dir(self.cfg.sampling.out_dir, "sample grids", "model.init_args.sampling.out_dir")

    def predict_step(self, batch, batch_idx: int) -> dict:
        from torchvision.utils import save_image

        s = self.cfg.sampling
        labels = (batch[0] if isinstance(batch, (list, tuple)) else batch["label"]).to(self.device)
        self._check_labels(labels)
        imgs = self.generate(labels, s.steps, s.sampler, s.cfg_scale, tuple(s.guidance_interval),
                             seed=batch_idx + 1000 * get_rank())
        path = os.path.join(s.out_dir, f"samples_rank{get_rank()}_{batch_idx:04d}.png")
        save_image((imgs + 1) / 2, path, nrow=s.grid_cols)
        return {"path": path, "labels": labels.cpu()}
