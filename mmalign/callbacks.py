"""Callbacks and plugins the CLI installs by default: data health, NaN guard, atomic checkpoints."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.stream import SKIP_REASONS, SKIPPED
from mmalign.distributed import all_gather_object

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; raised before the bad update reaches the weights."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same directory, fsyncs it, then renames it.

    ``os.replace`` is atomic on POSIX, so a crash or a full disk mid-write leaves the previous file
    intact instead of a truncated checkpoint that fails to resume.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class DataHealthMonitor(pl.Callback):
    """Counts samples the datamodule skipped as corrupt and reports them once per epoch.

    Streams attach ``__skipped__``/``__skip_reasons__`` to each batch; this callback removes those
    keys before the step sees the batch, sums them over ranks at epoch end, logs
    ``data/skipped_<stage>`` and warns with example reasons. Nothing is skipped silently.
    """

    def __init__(self, max_reasons: int = 5) -> None:
        self.max_reasons = max_reasons
        self.counts: dict[str, int] = {}
        self.reasons: dict[str, list[str]] = {}
        self.totals: dict[str, int] = {}  # over the whole run, rank-summed; for tests and reports

    def _take(self, stage: str, batch: Any) -> None:
        if not isinstance(batch, dict) or SKIPPED not in batch:
            return
        n = int(batch.pop(SKIPPED))
        reasons = batch.pop(SKIP_REASONS, [])
        self.counts[stage] = self.counts.get(stage, 0) + n
        kept = self.reasons.setdefault(stage, [])
        kept.extend(reasons[: max(0, self.max_reasons - len(kept))])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._take("train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._take("val", batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._take("test", batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._take("predict", batch)

    def _report(self, trainer, pl_module, stage: str) -> None:
        gathered = all_gather_object((self.counts.pop(stage, 0), self.reasons.pop(stage, [])))
        total = sum(c for c, _ in gathered)
        reasons = [r for _, rs in gathered for r in rs][: self.max_reasons]
        self.totals[stage] = self.totals.get(stage, 0) + total
        if total:
            rank_zero_warn(f"{stage}: skipped {total} corrupt/undecodable sample(s) this epoch "
                           f"(epoch {trainer.current_epoch}). Examples: {reasons}")
        for lg in trainer.loggers:
            lg.log_metrics({f"data/skipped_{stage}": float(total)}, step=trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val")
        else:
            self.counts.pop("val", None), self.reasons.pop("val", None)

    def on_test_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "predict")


class NaNGuard(pl.Callback):
    """Stops training at the first non-finite loss, before backward, so no bad update is applied
    and the last checkpoint on disk stays the last good one."""

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss.detach().float().mean())}) at global step {trainer.global_step}, "
                f"epoch {trainer.current_epoch}. No update was applied; resume from the last checkpoint "
                "with a lower learning rate, gradient clipping (trainer.gradient_clip_val) or fp32/bf16 "
                "instead of fp16.")
