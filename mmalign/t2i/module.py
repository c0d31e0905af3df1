"""``TextToImageDiffusion``: caption-conditioned flow matching, and SoftREPA on a trained checkpoint.

Training (``softrepa: null``): REPA's objective with captions for labels. ``x_t = (1 - t) x + t eps``,
``t ~ U(0, 1)`` per image, the backbone predicts ``eps - x`` under MSE given the frozen text
encoder's tokens and pooled vector; a caption is replaced by the empty one with probability
``caption_dropout``, so one network gives both terms of classifier-free guidance. EMA weights are what
validation and ``predict`` sample from.

SoftREPA (``softrepa: {...}`` + ``init_checkpoint``): the base's EMA weights are loaded and frozen,
soft tokens are attached with hooks (``softrepa.py``) and only they train, with the B x B contrastive
denoising loss. Sampling then runs the frozen backbone with the tokens.

Validation: the velocity loss on a fixed t grid; FD between validation images and images generated
for their captions (``fd``); and, with a judge, CLIP score and prompt accuracy of images generated for
the fixed prompt set, seen and held-out colour x shape combinations apart (``judge``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from datamodules.base import Preprocess
from mmalign.distributed import get_rank, get_world_size
from mmalign.diffusion.ema import EMA
from mmalign.diffusion.frozen import FrozenChildren
from mmalign.diffusion.transforms import diffusion_transform
from mmalign.diffusion.sampling import sample
from mmalign.specs import store_specs

from .backbones import TextDiffusionBackbone
from .softrepa import SoftTokens, error_matrix, softrepa_loss
from .specs import T2I_OPTIM, FDSpec, JudgeSpec, OptimSpec, SamplingSpec, SoftRepaSpec, T2IConfig, T2ISpec, TextSpec
from .text import FrozenTextEncoder, TextBatch

log = logging.getLogger(__name__)
SPECS = ("diffusion", "text", "softrepa", "judge", "fd", "sampling", "optim")


class TextToImageDiffusion(FrozenChildren, pl.LightningModule):
    """Text-to-image flow matching on a diffusers MMDiT or cross-attention U-Net, with SoftREPA.

    Args:
        diffusion: Backbone, image size, caption dropout, EMA (``T2ISpec``).
        text: The frozen text encoder and its per-caption cache (``TextSpec``).
        softrepa: SoftREPA options (``SoftRepaSpec``); null = plain flow-matching training.
        judge: Text-image alignment evaluation with a CLIP judge on a fixed prompt set (``JudgeSpec``).
        fd: Fréchet distance between validation images and images generated for their captions (``FDSpec``).
        sampling: ``predict``: sampler, guidance and captioned PNG grids (``SamplingSpec``).
        optim: AdamW, warm-up, schedule, clipping (``OptimSpec``; SoftREPA: lr 1e-3, wd 1e-4).
        init_checkpoint: A trained ``TextToImageDiffusion`` checkpoint whose (EMA) backbone weights start
            this model: the base of SoftREPA, or of plain fine-tuning.
    """

    frozen_children = ("text_encoder", "fd_metric", "judge_net")

    def __init__(
        self,
        diffusion: T2ISpec = T2ISpec(),
        text: TextSpec = TextSpec(),
        softrepa: SoftRepaSpec | None = None,
        judge: JudgeSpec = JudgeSpec(),
        fd: FDSpec = FDSpec(),
        sampling: SamplingSpec = SamplingSpec(),
        optim: OptimSpec = T2I_OPTIM,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg = T2IConfig.build(diffusion, text, softrepa, judge, fd, sampling, optim, init_checkpoint)
        self.save_hyperparameters()
        store_specs(self, {k: getattr(cfg, k) for k in SPECS})
        tx = cfg.text
        self.text_encoder = FrozenTextEncoder(tx.model, tx.clip_checkpoint, tx.clip_name, tx.max_tokens, tx.cache_size)
        d = cfg.diffusion
        self.backbone = TextDiffusionBackbone(d.backbone, d.image_size, self.text_encoder.token_dim,
                                              self.text_encoder.pooled_dim, **d.backbone_kwargs)
        if init_checkpoint:
            self._load_base(init_checkpoint)
        self.ema = self.soft = None
        if cfg.softrepa is not None:
            s = cfg.softrepa
            self.backbone.requires_grad_(False)  # SoftREPA: the base stays as it is, only the tokens train
            self.soft = SoftTokens(self.backbone, s.n_layers, s.n_tokens, s.unet_stages, s.timestep_offsets, s.init_std)
            self.soft.attach(self.backbone)
            log.info("SoftREPA: %d trainable parameters", sum(p.numel() for p in self.soft.parameters()))
        else:
            self.ema = EMA(self.backbone, d.ema_decay)
        self.fd_metric = self.fd_network = None
        if cfg.fd.num_samples:
            from mmalign.diffusion.fid import build_fd_metric

            self.fd_metric, self.fd_network = build_fd_metric(cfg.fd.network)
        self.judge_net = None
        if cfg.judge.active:
            from .judge import ClipJudge

            self.judge_net = ClipJudge(cfg.judge.checkpoint, cfg.judge.name)
        else:
            log.warning("judge.checkpoint is null: text-image alignment (prompt accuracy, CLIP score) is not evaluated; "
                        "set it to the quick start's CLIP checkpoint.")
        self._prompts = None  # read at the first evaluation: the data may not exist yet
        self._fd_captions: list[str] = []

    # ------------------------------------------------------------------ set-up
    def _load_base(self, path: str) -> None:
        """The EMA backbone of a trained checkpoint (the live weights if it has no EMA); the text encoder
        it was trained with must be this one."""
        from mmalign.models.weights import CheckpointMismatchError, load_checkpoint_file, read_state_dict

        raw = load_checkpoint_file(path, mmap=True)
        hp = raw.get("hyper_parameters", {}) if isinstance(raw, dict) else {}
        base_text, text = dict(hp.get("text") or {}), dict(self.hparams["text"])
        keys = ("model", "clip_checkpoint", "clip_name", "max_tokens")
        if base_text and any(base_text.get(k) != text.get(k) for k in keys):
            raise ValueError(f"init_checkpoint '{path}' was trained with text encoder "
                             f"{ {k: base_text.get(k) for k in keys} }, this model uses { {k: text.get(k) for k in keys} }; "
                             "the soft tokens and the backbone only fit the text features they were trained on.")
        sd = read_state_dict(path)
        prefix = "ema.module." if any(k.startswith("ema.module.") for k in sd) else "backbone."
        weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not weights:
            raise CheckpointMismatchError(f"init_checkpoint '{path}' holds no backbone.* or ema.module.* weights: not a "
                                          "TextToImageDiffusion checkpoint.")
        own = self.backbone.state_dict()
        bad = sorted(set(own) ^ set(weights)) + [k for k in own if k in weights and own[k].shape != weights[k].shape]
        if bad:
            raise CheckpointMismatchError(f"init_checkpoint '{path}' does not fit this backbone ({len(bad)} keys differ, "
                                          f"e.g. {bad[:3]}): set diffusion.backbone / backbone_kwargs as in its config.")
        self.backbone.load_state_dict(weights)
        log.info("backbone initialised from %s (%s)", path, prefix.rstrip("."))

    @property
    def preprocess(self) -> Preprocess:
        # no flip: captions name positions ("in the top left")
        t = diffusion_transform(self.cfg.diffusion.image_size)
        return Preprocess(train_transform=t, eval_transform=t)

    def prompt_set(self):
        if self._prompts is None and self.cfg.judge.prompts:
            from .judge import load_prompt_set

            self._prompts = load_prompt_set(self.cfg.judge.prompts, self.cfg.judge.prompt)
        return self._prompts

    # ------------------------------------------------------------------ model calls
    def encode_text(self, captions: list[str]) -> TextBatch:
        return self.text_encoder(captions)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text: TextBatch, ema: bool = False) -> torch.Tensor:
        net = self.ema if ema and self.ema is not None else self.backbone
        return net(x, t, text)

    def _captions(self, batch: dict) -> list[str]:
        if "text" not in batch:
            raise KeyError("batch has no 'text': TextToImageDiffusion trains on image-caption pairs; use "
                           "datamodules.ImageTextDataModule.")
        return list(batch["text"])

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, captions = batch["image"], self._captions(batch)
        b = images.shape[0]
        if self.soft is not None:
            return self._softrepa_step(images, captions)
        p = self.cfg.diffusion.caption_dropout
        if p > 0:
            drop = (torch.rand(b) < p).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        text = self.encode_text(captions)
        noise = torch.randn_like(images)
        t = torch.rand(b, device=images.device)
        tb = t.view(-1, 1, 1, 1)
        pred = self.backbone((1 - tb) * images + tb * noise, t, text)
        loss = F.mse_loss(pred.float(), (noise - images).float())
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def _softrepa_step(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        s = self.cfg.softrepa
        lo, hi = s.t_range
        t = lo + (hi - lo) * torch.rand((), device=images.device)  # one t and one noise for the whole batch
        noise = torch.randn((1, *images.shape[1:]), device=images.device)
        errors = error_matrix(self.backbone, images, noise, t, self.encode_text(captions))
        loss = softrepa_loss(errors, s.tau, s.scale, s.dweight)
        b = images.shape[0]
        with torch.no_grad():
            off = (errors.sum() - errors.diagonal().sum()) / max(1, b * b - b)
            acc = (errors.argmin(1) == torch.arange(b, device=errors.device)).float().mean()
        self.log_dict({"train/loss": loss, "train/err_matching": errors.diagonal().mean(), "train/err_other": off,
                       "train/caption_acc": acc}, batch_size=b, prog_bar=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.backbone, self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        val = gradient_clip_val if gradient_clip_val is not None else self.cfg.optim.grad_clip
        if val:
            self.clip_gradients(optimizer, gradient_clip_val=val, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        if self.soft is not None:
            return [(f"soft.{n}", p) for n, p in self.soft.named_parameters()]
        return [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return self.cfg.optim.build(self.trainable_named_parameters(), total)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, captions: list[str], steps: int, method: str = "euler", cfg_scale: float = 1.0,
                 interval: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> torch.Tensor:
        """Images in ``[-1, 1]`` for ``captions`` (noise seeded: the same every call)."""
        unique = list(dict.fromkeys(captions)) + [""]
        table = self.encode_text(unique)  # row i = caption i; the last row is the empty caption (CFG)
        idx = torch.tensor([unique.index(c) for c in captions], device=self.device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        bb = self.backbone
        noise = torch.randn((len(captions), bb.in_channels, bb.image_size, bb.image_size), generator=g).to(self.device)
        x = sample(lambda x, t, i: self.velocity(x, t, table.index(i), ema=True), noise, idx, len(unique) - 1, steps,
                   method, cfg_scale, interval)
        return x.clamp(-1, 1)

    def generate_in_batches(self, captions: list[str], steps: int, cfg_scale: float, seed: int, batch: int = 128):
        for start in range(0, len(captions), batch):
            yield start, self.generate(captions[start: start + batch], steps, "euler", cfg_scale, seed=seed + start)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, captions = batch["image"], self._captions(batch)
        g = torch.Generator(device="cpu").manual_seed(1234)  # fixed noise and t grid: comparable evaluations
        noise = torch.randn(images.shape, generator=g).to(images)
        t = (torch.arange(len(images), device=images.device).float() + 0.5) / len(images)
        tb = t.view(-1, 1, 1, 1)
        pred = self.velocity((1 - tb) * images + tb * noise, t, self.encode_text(captions), ema=True)
        self.log("val/loss_velocity", F.mse_loss(pred.float(), (noise - images).float()), batch_size=len(images),
                 sync_dist=True)
        if self.fd_metric is not None and not self.trainer.sanity_checking:
            from mmalign.diffusion.fid import add_real

            before = int(self.fd_metric.real_features_num_samples)
            add_real(self.fd_metric, images, self.cfg.fd.num_samples)
            self._fd_captions += captions[: int(self.fd_metric.real_features_num_samples) - before]

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        for key, value in self.evaluate_generation().items():
            self.log(f"val/{key}", value, sync_dist=False)

    @torch.no_grad()
    def evaluate_generation(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """FD (``fd``) and text-image alignment (``align/<group>/<metric>``) of freshly generated images."""
        out: dict[str, torch.Tensor] = {}
        fd, spec = self.fd_metric, self.cfg.fd
        if fd is not None and self._fd_captions:
            from mmalign.diffusion.fid import to_unit

            for _, imgs in self.generate_in_batches(self._fd_captions, spec.sample_steps, spec.cfg_scale,
                                                     10_000 * get_rank() + seed):
                fd.update(to_unit(imgs), real=False)
            out["fd"] = fd.compute()
            fd.reset()  # fakes only: real statistics are kept
            log.info("step %d val/fd = %.4f (%s)", self.global_step, float(out["fd"]), self.fd_network)
        if self.judge_net is not None:
            out.update({f"align/{k}": v for k, v in self.judge_prompt_set(seed).items()})
        return out

    @torch.no_grad()
    def judge_prompt_set(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Generate ``images_per_prompt`` images for every prompt of the prompt set (this rank's share) and
        score them with the judge."""
        from .judge import alignment_metric, score_images

        prompts, j = self.prompt_set(), self.cfg.judge
        metric = alignment_metric(self.judge_net, prompts).to(self.device)
        classes = torch.arange(len(prompts.classnames)).repeat(j.images_per_prompt)[get_rank()::get_world_size()]
        texts = [prompts.prompts()[i] for i in classes.tolist()]
        for start, imgs in self.generate_in_batches(texts, j.sample_steps, j.cfg_scale, 20_000 * get_rank() + seed):
            score_images(self.judge_net, prompts, imgs, classes[start: start + len(imgs)], metric)
        return metric.compute()

    # ------------------------------------------------------------------ predict
    def predict_dataloader(self):
        """Without predict shards: the prompt set's prompts, cycled to ``sampling.num_samples``."""
        prompts = self.prompt_set()
        if prompts is None:
            raise ValueError("predict needs prompts: set judge.prompts (the prompt set) or data.init_args.shards.predict "
                             "(captions of real samples).")
        texts = [prompts.prompts()[i % len(prompts.classnames)] for i in range(self.cfg.sampling.num_samples)]
        return torch.utils.data.DataLoader(texts, batch_size=max(1, min(len(texts), 64)),
                                           collate_fn=lambda b: {"text": list(b)})

    def on_predict_start(self) -> None:
        from mmalign.training.outputs import check_output_dir

        # before the first image is sampled, not after the first batch's minutes of sampling
        check_output_dir(self.cfg.sampling.out_dir, "sample grids", "model.init_args.sampling.out_dir")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        from .grid import save_captioned_grid

        s = self.cfg.sampling
        captions = self._captions(batch)
        imgs = self.generate(captions, s.steps, s.sampler, s.cfg_scale, tuple(s.guidance_interval),
                             seed=batch_idx + 1000 * get_rank())
        path = os.path.join(s.out_dir, f"samples_rank{get_rank()}_{batch_idx:04d}.png")
        save_captioned_grid(imgs, captions, path, s.grid_cols)
        return {"path": path, "captions": captions}
