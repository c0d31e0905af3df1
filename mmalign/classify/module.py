"""``ImageClassifier``: a timm model trained with cross-entropy, accuracy from torchmetrics."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from datamodules.base import Preprocess
from datamodules.transforms import default_image_transform
from mmalign.checkpoint_layout import CLASSIFIER_MOVED
from mmalign.models import compile_in_place
from mmalign.models.timm_models import check_timm_name, create_timm_model
from mmalign.specs import OptimSpec, coerce, store_specs
from mmalign.training.spec_module import ClipsGradients, ReadsFlatCheckpoints

from .specs import CLASSIFIER_OPTIM, ClassifierLossSpec, TimmNetworkSpec, TransformSpec, check_num_classes


class ImageClassifier(ReadsFlatCheckpoints, ClipsGradients, pl.LightningModule):
    """Image classification with any timm model.

    Args:
        network: timm model name, starting weights, constructor kwargs (``specs.TimmNetworkSpec``).
        num_classes: Number of classes; labels must lie in ``[0, num_classes)``.
        transform: Input side, normalisation, training augmentation (``specs.TransformSpec``).
        optim: AdamW, warm-up, schedule (``mmalign.specs.OptimSpec``; default lr 1e-3, weight decay
            0.05 on matrices only, cosine).
        loss: Cross-entropy label smoothing (``specs.ClassifierLossSpec``).
        compile: ``torch.compile`` the network: ``true`` (inductor) or ``torch.compile`` arguments
            (``{mode: max-autotune}``); state-dict keys are unchanged.
    """

    moved_options = CLASSIFIER_MOVED

    def __init__(
        self,
        network: TimmNetworkSpec = TimmNetworkSpec(),
        num_classes: int = 10,
        transform: TransformSpec = TransformSpec(),
        optim: OptimSpec = CLASSIFIER_OPTIM,
        loss: ClassifierLossSpec = ClassifierLossSpec(),
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        check_num_classes(num_classes)
        self.cfg = cfg = SimpleNamespace(
            network=coerce(network, TimmNetworkSpec, "network"), transform=coerce(transform, TransformSpec, "transform"),
            optim=coerce(optim, OptimSpec, "optim", base=CLASSIFIER_OPTIM),
            loss=coerce(loss, ClassifierLossSpec, "loss"))
        check_timm_name(cfg.network.name)
        self.save_hyperparameters()
        store_specs(self, vars(cfg))  # plain mappings: checkpoints load with weights_only=True
        self.num_classes = num_classes
        net = cfg.network
        self.model = create_timm_model(net.name, num_classes, net.pretrained, net.checkpoint_path, **(net.kwargs or {}))
        compile_in_place(self.model, compile)
        top5 = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    @property
    def preprocess(self) -> Preprocess:
        t = self.cfg.transform
        return Preprocess(
            train_transform=default_image_transform(t.image_size, True, t.mean, t.std, t.augment),
            eval_transform=default_image_transform(t.image_size, False, t.mean, t.std),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"label {int(labels.max())} outside [0, {self.num_classes}): set num_classes "
                             "to cover the data.")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._check_labels(batch["label"])
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.cfg.loss.label_smoothing)
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
        return self.cfg.optim.build(self.model.named_parameters(), self.trainer.estimated_stepping_batches)
