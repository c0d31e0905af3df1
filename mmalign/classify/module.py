"""``ImageClassifier``: a timm model trained with cross-entropy, accuracy from torchmetrics."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from datamodules.base import Preprocess
from datamodules.transforms import default_image_transform
from mmalign.models import compile_in_place
from mmalign.models.timm_models import check_timm_name, create_timm_model
from mmalign.optim import adamw_warmup_cosine


class ImageClassifier(pl.LightningModule):
    """Image classification with any timm model.

    Args:
        model_name: timm model name (``timm.list_models()``); unknown names list close matches.
        num_classes: Number of classes; labels must lie in ``[0, num_classes)``.
        pretrained: Use timm's pretrained tag (needs the weights in the local HF cache).
        checkpoint_path: Local weights file (timm/torchvision state dict, Lightning checkpoint or
            safetensors). A head of another class count is re-initialised.
        model_kwargs: Extra arguments of the timm constructor (e.g. ``layers``, ``channels``,
            ``drop_rate``).
        image_size: Input side of the transforms this model hands to the datamodule.
        mean: Normalisation mean of the transforms (timm's ImageNet default).
        std: Normalisation std of the transforms.
        augment: Random resized crop (scale 0.7-1) during training.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to norms and biases).
        warmup_steps: Linear warm-up steps before cosine decay over the run.
        label_smoothing: Cross-entropy label smoothing.
        compile: ``torch.compile`` the network: ``true`` (inductor) or ``torch.compile`` arguments
            (``{mode: max-autotune}``); state-dict keys are unchanged.
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 10,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        image_size: int = 64,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        augment: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        check_timm_name(model_name)
        self.save_hyperparameters()
        self.model = create_timm_model(model_name, num_classes, pretrained, checkpoint_path, **(model_kwargs or {}))
        compile_in_place(self.model, compile)
        top5 = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    @property
    def preprocess(self) -> Preprocess:
        h = self.hparams
        return Preprocess(
            train_transform=default_image_transform(h.image_size, True, h.mean, h.std, h.augment),
            eval_transform=default_image_transform(h.image_size, False, h.mean, h.std),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.hparams.num_classes):
            raise ValueError(f"label {int(labels.max())} outside [0, {self.hparams.num_classes}): set num_classes "
                             "to cover the data.")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._check_labels(batch["label"])
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, batch["label"])
        bs = len(batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/acc", self.train_acc, prog_bar=True, batch_size=bs)
        return loss

    def _eval_step(self, batch: dict, prefix: str, acc, top5) -> None:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        acc(logits, batch["label"])
        top5(logits, batch["label"])
        bs = len(batch["label"])
        # metric objects sync across ranks at epoch end; the loss is averaged per rank then synced
        self.log(f"{prefix}/loss", loss, batch_size=bs, sync_dist=True)
        self.log(f"{prefix}/acc", acc, prog_bar=True, batch_size=bs)
        self.log(f"{prefix}/top5", top5, batch_size=bs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc, self.val_top5)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc, self.test_top5)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Per sample: its key, the top-1 class and confidence, the top-5 classes (written to
        ``predictions.jsonl`` by the CLI's prediction writer)."""
        probs = self(batch["image"]).softmax(-1)
        conf, pred = probs.max(-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices
        out = {"key": batch.get("key"), "pred": pred, "confidence": conf, "top5": top}
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def configure_optimizers(self):
        h = self.hparams
        return adamw_warmup_cosine(self.model.named_parameters(), self.trainer.estimated_stepping_batches, h.lr,
                                   h.weight_decay, warmup_steps=h.warmup_steps)
